"""OpenCLIP's ``text_cfg`` <-> ``TextConfig``, for its standard ``TextTransformer`` (and, handed to
``openclip_hf``, its Hugging Face text towers).

Every option OpenCLIP's model configs set on that tower is mapped (CLIP's causal model, the
SigLIP and SigLIP 2 text towers, CLIPA's, MetaCLIP 2 worldwide's ``eos`` pooling, LayerScale).
CoCa's class token (``embed_cls``) too. An option that would change the model and has no
counterpart is reported, never dropped:
``text_from_openclip`` returns it in its list of unsupported settings.
"""

from __future__ import annotations

from typing import Any

from clipforge.config import TextConfig
from clipforge.model.interop.openclip_hf import hf_text_from_openclip, hf_text_to_openclip

# Options that cannot change the standard tower's output: OpenCLIP's _build_text_tower does not
# pass final_ln_after_pool on, output_tokens only adds a second output, hf_* only apply with
# hf_model_name, and block_type 'default' is the block we build.
_IGNORED = {"final_ln_after_pool", "output_tokens", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_POOLS = {"argmax": "eot", "eos": "eot", "first": "first", "last": "last"}
_CLEANS = ("whitespace", "lower", "canonicalize")


def text_from_openclip(t: dict[str, Any]) -> tuple[TextConfig, list[str]]:
    """(TextConfig, unsupported settings as ``key=value``) from an OpenCLIP ``text_cfg`` dict."""
    if t.get("hf_model_name"):  # a Hugging Face encoder: its own options (openclip_hf)
        return hf_text_from_openclip(t)
    t = dict(t)
    bad: list[str] = []

    def take(key: str, default: Any) -> Any:
        return t.pop(key) if key in t else default

    vocab = int(take("vocab_size", 49408))
    pool_type = take("pool_type", "argmax")
    eos_id = take("eos_id", 2)
    if pool_type not in _POOLS:
        bad.append(f"text pool_type={pool_type!r}")
    # argmax pools at the highest id, which is CLIP's end token: the first occurrence of the top id.
    eot = int(eos_id) if pool_type == "eos" else vocab - 1
    act = dict(take("act_kwargs", None) or {})
    norm = dict(take("norm_kwargs", None) or {})
    tok = dict(take("tokenizer_kwargs", None) or {})
    approximate = act.pop("approximate", "none")
    eps = float(norm.pop("eps", 1e-5))
    clean = tok.pop("clean", "whitespace")
    strip_sep = bool(tok.pop("strip_sep_token", False))
    bad += [f"text act_kwargs.{k}={v!r}" for k, v in act.items()]
    bad += [f"text norm_kwargs.{k}={v!r}" for k, v in norm.items()]
    bad += [f"text tokenizer_kwargs.{k}={v!r}" for k, v in tok.items()]
    if approximate not in ("none", "tanh"):
        bad.append(f"text act_kwargs.approximate={approximate!r}")
    if clean not in _CLEANS:
        bad.append(f"text tokenizer_kwargs.clean={clean!r}")
    proj_type = take("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        bad.append(f"text proj_type={proj_type!r}")
    if take("block_type", None) not in (None, "default"):
        bad.append("text block_type (only the default block is implemented)")
    tokenizer_mode = take("tokenizer_mode", None)
    if tokenizer_mode:
        bad.append(f"text tokenizer_mode={tokenizer_mode!r}")
    embed_cls = bool(take("embed_cls", False))  # pooled at the class token, whatever pool_type says
    ls = take("ls_init_value", None)
    cfg = dict(
        context_length=int(take("context_length", 77)), vocab_size=vocab, width=int(take("width", 512)),
        heads=int(take("heads", 8)), layers=int(take("layers", 12)), mlp_ratio=float(take("mlp_ratio", 4.0)),
        eot_token_id=eot, pad_token_id=int(take("pad_id", 0)), pool=_POOLS.get(pool_type, "eot"),
        causal_mask=not take("no_causal_mask", False), proj_bias=bool(take("proj_bias", False)),
        proj_type=proj_type if proj_type in ("linear", "none") else "linear", norm_eps=eps,
        gelu_approximate=approximate if approximate in ("none", "tanh") else "none",
        ls_init_value=None if ls is None else float(ls), hf_tokenizer_name=take("hf_tokenizer_name", None),
        tokenizer_clean=clean if clean in _CLEANS else "whitespace", tokenizer_strip_sep=strip_sep,
        embed_cls=embed_cls,
    )
    for k in _IGNORED:
        t.pop(k, None)
    # Anything left changes the model when set: the custom block's options, an HF text tower.
    bad += [f"text {k}={v!r}" for k, v in t.items() if v not in (None, False, 0, 0.0, {}, [])]
    return TextConfig(**cfg), bad


def text_to_openclip(t: TextConfig) -> dict[str, Any]:
    """The ``text_cfg`` OpenCLIP builds the same tower from (its defaults left out)."""
    if t.hf_model is not None:
        return hf_text_to_openclip(t)
    out: dict[str, Any] = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                           "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pad_id": t.pad_token_id}
    if t.pool == "eot" and t.eot_token_id != t.vocab_size - 1:  # argmax finds the end token only as the top id
        out.update(pool_type="eos", eos_id=t.eot_token_id)
    elif t.pool in ("first", "last"):
        out["pool_type"] = t.pool
    if not t.causal_mask:
        out["no_causal_mask"] = True
    if t.proj_type == "none":
        out["proj_type"] = "none"
    elif t.proj_bias:
        out["proj_bias"] = True
    if t.norm_eps != 1e-5:
        out["norm_kwargs"] = {"eps": t.norm_eps}
    if t.gelu_approximate != "none":
        out["act_kwargs"] = {"approximate": t.gelu_approximate}
    if t.ls_init_value is not None:
        out["ls_init_value"] = t.ls_init_value
    if t.embed_cls:
        out["embed_cls"] = True
    if t.hf_tokenizer_name is not None:
        out["hf_tokenizer_name"] = t.hf_tokenizer_name
        kwargs: dict[str, Any] = {}
        if t.tokenizer_clean not in ("whitespace", "none"):
            kwargs["clean"] = t.tokenizer_clean
        if t.tokenizer_strip_sep:
            kwargs["strip_sep_token"] = True
        if kwargs:
            out["tokenizer_kwargs"] = kwargs
    return out
