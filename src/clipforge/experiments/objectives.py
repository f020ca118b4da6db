"""The three pre-training objectives of the paper's Figure 2, on one image tower.

* ``caption``: a transformer decoder predicts the caption's tokens, cross-attending to the image
  tower's patch tokens (VirTex-style image captioning, the paper's first baseline).
* ``bow``: the image tower predicts the caption's bag of words: softmax cross-entropy against
  the normalised word counts (the paper's second baseline).
* ``contrastive``: CLIP, through the library's own model and ``clip_loss``.

All three use the same ``VisionTransformer`` configuration. The predictive models work over a
compact vocabulary: the BPE ids that occur in the training captions (a few hundred), so that
neither pays for a 49k-way softmax it could never use.

Zero-shot classification, as the paper did it for each objective: the caption model scores a
class prompt by its log-likelihood given the image (sum over its tokens, end token included);
the BoW model by the prompt's bag of words under the predicted distribution (sum_w q(w) log
p(w|image), the negative of its training loss); CLIP by cosine similarity.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ClipConfig, VisionConfig
from clipforge.model.layers import Attention, LayerNorm, Mlp
from clipforge.model.vision import VisionTransformer

Kind = Literal["caption", "bow", "contrastive"]
KINDS: tuple[Kind, ...] = ("caption", "bow", "contrastive")


class Vocab:
    """BPE ids seen in training captions -> compact ids; 0 pad, 1 unknown, 2 start, 3 end."""

    PAD, UNK, SOT, EOT = 0, 1, 2, 3

    def __init__(self, bpe_ids: Sequence[int]) -> None:
        from clipforge.model.tokenizer import EOT_ID, SOT_ID

        self.bpe = sorted(set(int(i) for i in bpe_ids) - {0, SOT_ID, EOT_ID})
        self.index = {b: i + 4 for i, b in enumerate(self.bpe)}
        self._sot, self._eot = SOT_ID, EOT_ID

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Vocab":
        from clipforge.model import factory

        return cls(factory.tokenize(list(texts)).unique().tolist())

    def __len__(self) -> int:
        return len(self.bpe) + 4

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        from clipforge.model import factory

        out = []
        for row in factory.tokenize(list(texts)).tolist():
            body = row[1:row.index(self._eot)] if self._eot in row else row[1:]
            out.append([self.index.get(b, self.UNK) for b in body if b != 0])
        return out

    def encode(self, texts: Sequence[str], max_len: int = 32) -> torch.Tensor:
        """[start, words..., end, pad...] -> LongTensor [N, L], L = longest row (<= max_len)."""
        rows = [[self.SOT, *ids[: max_len - 2], self.EOT] for ids in self._ids(texts)]
        out = torch.full((len(rows), max(len(r) for r in rows)), self.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def bag(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised word counts [N, V] (unknown words dropped; an all-unknown text stays zero)."""
        out = torch.zeros(len(texts), len(self))
        for i, ids in enumerate(self._ids(texts)):
            for j in ids:
                if j != self.UNK:
                    out[i, j] += 1
        return out / out.sum(dim=1, keepdim=True).clamp(min=1)


def vit_tokens(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Every output token of a ViT tower (class token first), after ``ln_post``: [B, 1+g*g, W].
    Token 0 is what the tower pools: ``vit_tokens(v, x)[:, 0] @ v.proj == v(x)``."""
    x = visual.conv1(x).flatten(2).transpose(1, 2)  # [B, g*g, W]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [B, 1+g*g, W]
    return visual.ln_post(visual.transformer(visual.ln_pre(x)))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        q = self.q(x).view(b, n, h, dh).transpose(1, 2)  # [B, H, N, Dh]
        k, v = self.kv(memory).view(b, memory.shape[1], 2, h, dh).permute(2, 0, 3, 1, 4)  # 2 x [B, H, T, Dh]
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the image tokens, MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(width), Attention(width, heads)
        self.ln_x, self.cross = LayerNorm(width), CrossAttention(width, heads)
        self.ln_2, self.mlp = LayerNorm(width), Mlp(width, 4 * width, quick_gelu=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=True)
        x = x + self.cross(self.ln_x(x), memory)
        return x + self.mlp(self.ln_2(x))


class CaptionModel(nn.Module):
    """Image tower -> patch tokens -> (the tower's projection) -> transformer caption decoder."""

    def __init__(self, vision: VisionConfig, vocab_size: int, width: int, layers: int, heads: int,
                 max_len: int = 32) -> None:
        super().__init__()
        self.visual = VisionTransformer(vision, width, quick_gelu=False)  # proj maps every token to the decoder
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(max_len, width))
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(layers))
        self.ln_final = LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        return vit_tokens(self.visual, images) @ self.visual.proj  # [B, T, D]

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # [B, L, D]
        for block in self.blocks:
            x = block(x, memory)
        return self.ln_final(x) @ self.token_embedding.weight.T  # [B, L, V], tied output embedding

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        lg = self.logits(self.memory(images), tokens[:, :-1])  # predict token t+1 from tokens <= t
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=Vocab.PAD)

    @torch.no_grad()
    def log_likelihood(self, memory: torch.Tensor, tokens: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """log p(prompt | image) for every image x prompt: memory [N, T, D], tokens [C, L] -> [N, C]."""
        n, c = memory.shape[0], tokens.shape[0]
        per = max(1, chunk // c)  # images per chunk
        out = []
        for s in range(0, n, per):
            mem = memory[s:s + per]
            m = mem.shape[0]
            mem = mem[:, None].expand(m, c, *mem.shape[1:]).reshape(m * c, *mem.shape[1:])  # [m*C, T, D]
            tok = tokens.to(mem.device).repeat(m, 1)  # [m*C, L]
            logp = self.logits(mem, tok[:, :-1]).log_softmax(-1)  # [m*C, L-1, V]
            target = tok[:, 1:]
            ll = logp.gather(-1, target[..., None]).squeeze(-1) * (target != Vocab.PAD)  # [m*C, L-1]
            out.append(ll.sum(dim=1).view(m, c))
        return torch.cat(out)


class BagOfWordsModel(nn.Module):
    """Image tower whose projection maps the pooled feature to word logits (plus a bias)."""

    def __init__(self, vision: VisionConfig, vocab_size: int) -> None:
        super().__init__()
        self.visual = VisionTransformer(vision, vocab_size, quick_gelu=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images) + self.bias  # [B, V]


class Objective(Protocol):
    model: nn.Module

    def loss(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor: ...

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class CaptionObjective:
    def __init__(self, arch: ClipConfig, vocab: Vocab, captions: Sequence[str]) -> None:
        t = arch.text  # the decoder is as wide and deep as CLIP's text tower at this size
        self.vocab = vocab
        self.model = CaptionModel(arch.vision, len(vocab), t.width, t.layers, t.heads)
        self.tokens = vocab.encode(captions)  # [N, L]

    def loss(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        tok = self.tokens[idx]
        tok = tok[:, : int((tok != Vocab.PAD).sum(1).max())].to(images.device)  # trim shared padding
        return self.model.loss(images, tok)

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.log_likelihood(self.model.memory(images), self.vocab.encode(prompts))


class BagOfWordsObjective:
    def __init__(self, arch: ClipConfig, vocab: Vocab, captions: Sequence[str]) -> None:
        self.vocab = vocab
        self.model = BagOfWordsModel(arch.vision, len(vocab))
        self.bags = vocab.bag(captions)  # [N, V]

    def loss(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        target = self.bags[idx].to(images.device)
        return -(target * self.model(images).log_softmax(-1)).sum(-1).mean()

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.model(images).log_softmax(-1) @ self.vocab.bag(prompts).to(images.device).T  # [N, C]


class ContrastiveObjective:
    def __init__(self, arch: ClipConfig, captions: Sequence[str]) -> None:
        from clipforge.model import factory

        self.model = factory.create_model(arch)
        self.tokens = factory.tokenize(list(captions))  # [N, 77]; the tower trims the padding

    def loss(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        from clipforge.train.loss import clip_loss

        out = self.model(images, self.tokens[idx].to(images.device))
        return clip_loss(out.image_features, out.text_features, out.logit_scale)

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from clipforge.model import factory

        txt = self.model.encode_text(factory.tokenize(list(prompts)).to(images.device), normalize=True)
        return self.model.encode_image(images, normalize=True) @ txt.T  # [N, C]


def build_objective(kind: Kind, arch: ClipConfig, captions: Sequence[str], vocab: Vocab | None = None) -> Objective:
    """The objective ``kind`` on ``arch``'s image tower, with targets for ``captions`` (row order)."""
    if kind == "contrastive":
        return ContrastiveObjective(arch, captions)
    vocab = vocab or Vocab.from_texts(captions)
    if kind == "caption":
        return CaptionObjective(arch, vocab, captions)
    if kind == "bow":
        return BagOfWordsObjective(arch, vocab, captions)
    raise ValueError(f"unknown objective {kind!r}; known: {', '.join(KINDS)}")
