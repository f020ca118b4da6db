"""OpenCLIP's CoCa options <-> clipforge's: ``multimodal_cfg`` <-> ``DecoderConfig``, and the
image tower's ``attentional_pool`` / ``output_tokens`` that come with it.

OpenCLIP's decoder (``_build_text_decoder_tower``) reads only ``context_length``, ``width``,
``heads``, ``layers`` and ``ls_init_value`` of ``multimodal_cfg`` (its output size is the text
tower's vocabulary, its MLP ratio always 4), so the other keys there cannot change the model.
"""

from __future__ import annotations

from typing import Any

from clipforge.config import ClipConfig, DecoderConfig

_DECODER_KEYS = ("context_length", "width", "heads", "layers", "ls_init_value")
_OPENCLIP_DEFAULTS = DecoderConfig()  # the same as OpenCLIP's MultimodalCfg's


def decoder_from_openclip(model_cfg: dict[str, Any]) -> tuple[DecoderConfig | None, list[str]]:
    """(the decoder, unsupported settings) of an OpenCLIP model config; (None, []) without one."""
    m = model_cfg.get("multimodal_cfg")
    if m is None:
        return None, []
    bad: list[str] = []
    fields = {k: m[k] for k in _DECODER_KEYS if k in m}
    try:
        return DecoderConfig(**fields), bad
    except (TypeError, ValueError) as e:
        return None, [*bad, f"multimodal_cfg ({e})"]


def vision_attn_pool_bad(v: dict[str, Any]) -> list[str]:
    """The attentional pooler's forms OpenCLIP marks as work in progress ('parallel', 'cascade':
    their pooled output keeps a query axis, and ln_post's width must equal the tower's)."""
    pool = v.get("attentional_pool", False)
    if isinstance(pool, str):
        return [f"vision attentional_pool={pool!r} (OpenCLIP's unfinished two-pooler form)"]
    return []


def attn_pool_fields(v: dict[str, Any]) -> dict[str, Any]:
    """VisionConfig fields for OpenCLIP's vision_cfg: the pooler's, when it has one."""
    if v.get("attentional_pool") is not True:
        return {}
    return {"attentional_pool": True, "attn_pooler_queries": int(v.get("attn_pooler_queries", 256)),
            "attn_pooler_heads": int(v.get("attn_pooler_heads", 8))}


def coca_to_openclip(cfg: ClipConfig, model: dict[str, Any]) -> None:
    """Add a CoCa model's options to the OpenCLIP model config ``model`` (in place)."""
    v = cfg.vision
    if v.attentional_pool:
        model["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=v.attn_pooler_queries,
                                   attn_pooler_heads=v.attn_pooler_heads)
    if cfg.text.embed_cls:  # OpenCLIP's CLIP class would drop the text tower's cls_emb
        model["custom_text"] = True
    if cfg.decoder is None:
        return
    d = cfg.decoder
    model["multimodal_cfg"] = {"context_length": d.context_length, "vocab_size": cfg.text.vocab_size,
                               "width": d.width, "heads": d.heads, "layers": d.layers}
    if d.ls_init_value is not None:
        model["multimodal_cfg"]["ls_init_value"] = d.ls_init_value
    # OpenCLIP's CoCa unpacks (pooled, tokens) from both towers; it keeps the text tower under text.
    model["vision_cfg"]["output_tokens"] = True
    model["text_cfg"]["output_tokens"] = True
