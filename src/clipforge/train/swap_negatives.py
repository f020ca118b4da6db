"""Swapped-word hard negatives (``TrainConfig.swap_negatives``, ``swap_words``): NegCLIP's
negatives (Yuksekgonul et al., 2023) with every alternative at once. One attribute word of each
caption (a colour, a shape, a size ...) is chosen at random, or with ``swap_every_word`` each of
them in turn, and the caption is copied once per other value of that attribute ("a red circle" ->
"a red hexagon", "a red square", ...); the copies are extra wrong answers for the caption's own
image only. In-batch negatives rarely differ from a
caption in one word, so without them the loss barely asks for fine distinctions such as circle
against hexagon (benchmarks/demo/RESULTS.md).

Words are matched and swapped as token sequences, so captions are not tokenized again; the
randomness is torch's global generator, which checkpoints save (exact resume).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.errors import DataError
from clipforge.train.config import ConfigError


@dataclass(frozen=True)
class SwapTable:
    """Token sequences of the attribute words: ``words[seq] = (attribute, value)`` and, per
    attribute, each value's synonyms as token sequences."""

    words: dict[tuple[int, ...], tuple[int, int]]
    values: list[list[list[tuple[int, ...]]]]  # [attribute][value] -> synonyms
    longest: int
    starts: frozenset[int]  # first tokens of the words: other positions are skipped at once


def read_swap_words(path: str | Path) -> dict[str, list[list[str]]]:
    """A JSON object: attribute name -> list of values, each a list of synonymous words."""
    try:
        groups = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"swap_words {path}: {e}") from None
    ok = isinstance(groups, dict) and all(
        isinstance(v, list) and len(v) >= 2 and all(isinstance(g, list) and g and all(isinstance(w, str) and w.strip()
                                                                                       for w in g) for g in v)
        for v in groups.values())
    if not ok or not groups:
        raise ConfigError(f"swap_words {path}: expected {{attribute: [[word, synonym, ...], ...]}} with at least "
                          "two values per attribute")
    return groups


def build_swap_table(groups: dict[str, list[list[str]]], tokenizer: Callable[[Sequence[str]], torch.Tensor],
                     eot_id: int, pad_id: int) -> SwapTable:
    words: dict[tuple[int, ...], tuple[int, int]] = {}
    values: list[list[list[tuple[int, ...]]]] = []
    for a, attribute in enumerate(groups.values()):
        values.append([])
        for v, synonyms in enumerate(attribute):
            rows = tokenizer(list(synonyms)).tolist()
            seqs = [tuple(t for t in row[1:] if t not in (eot_id, pad_id)) for row in rows]
            values[a].append(seqs)
            for seq in seqs:
                if seq in words and words[seq] != (a, v):
                    raise ConfigError(f"swap_words: {synonyms[seqs.index(seq)]!r} belongs to two values")
                words[seq] = (a, v)
    return SwapTable(words, values, max(len(s) for s in words), frozenset(s[0] for s in words))


def _matches(row: list[int], table: SwapTable, end: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, attribute, value) of each attribute word in row[1:end], longest first."""
    found, i = [], 1
    while i < end:
        if row[i] not in table.starts:
            i += 1
            continue
        for n in range(min(table.longest, end - i), 0, -1):
            hit = table.words.get(tuple(row[i:i + n]))
            if hit is not None:
                found.append((i, i + n, *hit))
                i += n
                break
        else:
            i += 1
    return found


Word = tuple[int, int]  # (attribute, value)
Pair = tuple[Word, Word]


def _neighbours(found: list[tuple[int, int, int, int]]) -> set[Pair]:
    """Each attribute word with the next one of the caption, in order ("black" then "circle")."""
    words = [(a, v) for _, _, a, v in found]
    return set(zip(words, words[1:]))


def attested_pairs(tokens: torch.Tensor, table: SwapTable, eot_id: int) -> frozenset[Pair]:
    """The pairs of neighbouring attribute words that occur in these [N, L] captions."""
    pairs: set[Pair] = set()
    for row in tokens.tolist():
        pairs |= _neighbours(_matches(row, table, row.index(eot_id) if eot_id in row else len(row)))
    return frozenset(pairs)


def swap_negatives(tokens: torch.Tensor, table: SwapTable, k: int, eot_id: int, pad_id: int,
                   every_word: bool = False, attested: frozenset[Pair] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] captions -> ([B, k, L] swapped copies, [B, k] mask of the real ones). A caption
    without an attribute word has none. One word, drawn at random, is swapped for each other value
    of its attribute (``every_word``: each word in turn, in random order); past k copies, a random
    k of them are kept. Each copy takes a random synonym of its new value. With ``attested``, a
    copy is made only where the new word and each attribute word beside it form a pair found
    there: a negative no training caption could be is one the model learns to refuse from the
    pair alone ("black" is never followed by "hexagon"), whatever the image shows."""
    b, length = tokens.shape
    seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's generator (checkpointed)
    rng = random.Random(seed)
    out = np.full((b, k, length), pad_id, dtype=np.int64)
    real = np.zeros((b, k), dtype=bool)
    for r, row in enumerate(tokens.tolist()):
        end = row.index(eot_id) if eot_id in row else length
        found = _matches(row, table, end)
        if not found:
            continue
        chosen = range(len(found)) if every_word else [rng.randrange(len(found))]
        swaps = [(found[i][0], found[i][1], found[i][2], w) for i in chosen
                 for w in range(len(table.values[found[i][2]])) if w != found[i][3]
                 if attested is None or _attested(found, i, (found[i][2], w), attested)]
        for j, (start, stop, a, w) in enumerate(rng.sample(swaps, min(k, len(swaps)))):
            new = (row[:start] + list(rng.choice(table.values[a][w])) + row[stop:end])[:length - 1] + [eot_id]
            out[r, j, :len(new)] = new
            real[r, j] = True
    return torch.from_numpy(out).to(tokens.dtype), torch.from_numpy(real)


def _attested(found: list[tuple[int, int, int, int]], i: int, new: Word, attested: frozenset[Pair]) -> bool:
    return (i == 0 or ((found[i - 1][2], found[i - 1][3]), new) in attested) and \
        (i + 1 == len(found) or (new, (found[i + 1][2], found[i + 1][3])) in attested)


Maker = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # tokens -> (copies, mask)


def swap_negatives_for(cfg, model, world_size: int) -> Maker | None:
    """The trainer's negatives maker for ``cfg.swap_negatives`` (None when off); refuses the
    settings the extra columns are not implemented for."""
    if not cfg.swap_negatives:
        return None
    text = model.config.text
    why = ("it needs one process" if world_size > 1 else "it needs grad_accum 1" if cfg.grad_accum > 1
           else "it needs CLIP's loss, untiled" if cfg.loss != "clip" or cfg.loss_tile else
           "a CoCa model's captioning loss is not combined with it" if model.config.decoder is not None else
           "it needs a text tower that reads CLIP's BPE tokens" if text.hf_model or text.hf_tokenizer_name else None)
    if why:
        raise ConfigError(f"swap_negatives: {why}")
    captions = None
    if cfg.swap_attested:
        from clipforge.data.sources import table_captions

        try:
            captions = table_captions(cfg.data)
        except DataError as e:
            raise ConfigError(f"swap_attested: {e}") from None
    return negatives_maker(read_swap_words(cfg.swap_words), model, cfg.swap_negatives, cfg.swap_every_word, captions)


def negatives_maker(groups: dict[str, list[list[str]]], model, k: int, every_word: bool = False,
                    captions: Sequence[str] | None = None) -> Maker:
    """tokens -> (up to ``k`` swapped copies, mask) for ``model``'s tokenizer and word ``groups``;
    with ``captions`` (the training set's), only copies whose neighbouring word pairs occur there."""
    from clipforge.model.factory import tokenizer_for

    text = model.config.text
    tokenizer = tokenizer_for(model)
    table = build_swap_table(groups, tokenizer, text.eot_token_id, text.pad_token_id)
    attested = None
    if captions is not None:
        captions = list(captions)
        attested = frozenset().union(*(attested_pairs(tokenizer(captions[i:i + _SCAN]), table, text.eot_token_id)
                                       for i in range(0, len(captions), _SCAN)))
    return functools.partial(swap_negatives, table=table, k=k, eot_id=text.eot_token_id, pad_id=text.pad_token_id,
                             every_word=every_word, attested=attested)


_SCAN = 8192  # captions tokenized at a time while reading the training set's word pairs
