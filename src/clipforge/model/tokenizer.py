"""OpenAI CLIP's byte-level BPE tokenizer, id-for-id identical to OpenCLIP's ``tokenize``.

The vocabulary (49,408 ids: 256 byte symbols, the same 256 closing a word with ``</w>``, 48,894
merges, ``<start_of_text>`` and ``<end_of_text>``) is vendored in ``clipforge/assets`` and read on
first use, never at import time.

Pipeline, as OpenAI defined it: ftfy.fix_text -> html.unescape twice -> collapse whitespace to
single spaces -> lowercase -> split into pieces with one regex -> UTF-8 bytes of each piece mapped
to printable symbols -> BPE merges by rank -> ids. Speed comes from three exact shortcuts:

* Cleaning is skipped for printable ASCII without ``&``: ftfy and ``html.unescape`` leave such
  text unchanged, so only the whitespace collapse and lowercasing remain.
* No regex piece contains or crosses a space, so the ids of a text are the concatenation of the
  ids of its space-separated chunks; chunk -> ids and piece -> ids are cached (bounded), and
  repeated words cost one dict lookup.
* BPE works on integer ids and, after each merge, re-ranks only the two pairs next to it; the
  output tensor is filled in one vectorised numpy assignment.

Bounded work per text (issue 19). BPE of one piece is quadratic in its length (a word of 16,000
letters took 3 s), and a text only keeps ``context_length - 2`` ids. So ``tok(texts)`` stops
encoding a text once it has the ids it can keep, and a piece too long to matter in full is cut
before merging: only its first bytes are merged, without the end-of-word mark, and only the
tokens that end at least ``_Tables.lookahead`` bytes before the cut are kept (the prefix grows
until they are as many as the text still needs). Those are the
full piece's own tokens: a cut changes a merge only where a chain of pairs, each merged
earlier than the one to its left, reaches back from the cut, and the longest such chain in the
vocabulary spans 146 bytes for OpenAI's (computed from the merges: ``_Tables.lookahead``, which
adds one token's length as a margin; the longest chain, written out, changes ids 141 bytes back).
A piece is cut only when it is longer than ~6 bytes per id the text still needs, plus the
lookahead: a text whose ids fit in the context is encoded exactly as before (its pieces are
either short or give the ids it needs), and a truncated one keeps exactly the ids the uncut
encoding keeps. So a text costs at most a few merges of ~600 bytes (77 ids), however long its
words. ``encode`` (no truncation) never cuts.
"""

from __future__ import annotations

import functools
import gzip
import html
import sys
from importlib import resources
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex
import torch

from clipforge.errors import ClipforgeError

__all__ = [
    "Tokenizer", "TextTooLongError", "tokenize", "decode", "clean_text", "CONTEXT_LENGTH", "SOT_ID", "EOT_ID", "PAD_ID"
]

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # OpenCLIP's spelling of OpenAI's specials
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)  # 48,894 lines after the header
# OpenCLIP's pattern, flags included: IGNORECASE is not a no-op on lowercased text ("'ſ" matches
# "'s" under case folding), so it stays for exact parity.
_PIECE_PATTERN = (
    "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_NO_MERGE = 1 << 30  # rank of a pair that is not a merge
_MAX_CACHE = 1 << 18  # entries per cache; cleared when full so memory stays bounded on huge corpora


class TextTooLongError(ClipforgeError, ValueError):
    """A text encodes to more tokens than the context length and truncation was turned off."""


def _byte_symbols() -> tuple[list[str], list[int]]:
    """The 256 printable stand-ins for bytes, in vocabulary order (OpenAI's ``bytes_to_unicode``).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft
    hyphen) take the code points from U+0100 upwards, so no symbol is whitespace.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(keep)
    moved = [b for b in range(256) if b not in kept]
    symbols = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]
    return symbols, keep + moved  # vocabulary position -> symbol, -> byte


class _Tables:
    """Immutable lookup tables built from a vocabulary file (shared by every Tokenizer)."""

    def __init__(self, merges_text: str):
        lines = merges_text.split("\n", _NUM_MERGES + 1)[1 : _NUM_MERGES + 1]  # skip the version header
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"BPE vocabulary file is malformed: expected {_NUM_MERGES} merge lines of two symbols")
        symbols, byte_order = _byte_symbols()
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        encoder = {s: i for i, s in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.special = {s: encoder[s] for s in SPECIAL_TOKENS}
        # Byte -> id of its symbol inside a word, and as the last symbol of a word (with </w>).
        self.byte_id = [0] * 256
        self.byte_end_id = [0] * 256
        for byte, sym in zip(byte_order, symbols):
            self.byte_id[byte] = encoder[sym]
            self.byte_end_id[byte] = encoder[sym + "</w>"]
        # Pair of ids -> merge rank; rank -> id of the merged symbol. Every symbol BPE can
        # produce is in the vocabulary, so ids stand in for symbol strings one to one.
        self.rank: dict[tuple[int, int], int] = {}
        self.merged_id: list[int] = []
        for rank, (left, right) in enumerate(merges):
            # A repeated merge would keep its last rank, as OpenAI's dict(zip(merges, ranks)) does.
            self.rank[encoder[left], encoder[right]] = rank
            self.merged_id.append(encoder[left + right])
        byte_of = {sym: byte for byte, sym in zip(byte_order, symbols)}
        decoder = {i: s for s, i in encoder.items()}
        self.id_bytes = [bytes(byte_of[c] for c in decoder[i]) for i in range(len(vocab))]
        self.pattern = regex.compile(_PIECE_PATTERN, regex.IGNORECASE)
        # Bytes of a piece each id covers (the end-of-word mark not counted).
        self.id_len = [len(b) - 4 if b.endswith(b"</w>") else len(b) for b in self.id_bytes]
        self.max_token_bytes = max(self.id_len[: len(vocab) - len(SPECIAL_TOKENS)])

    @functools.cached_property
    def lookahead(self) -> int | None:
        """How far (bytes) back from the end of a piece's prefix its merges can differ from the
        whole piece's; ``None`` if the merges are not in creation order (then pieces are never cut).

        Every merge's parts are bytes or symbols of earlier merges (BPE learns merges in that
        order), so merging by rank is merging rank 0, 1, 2, ... in turn, each left to right.
        Cutting a piece after byte L changes what the symbol ``y`` ending at L merges with; the
        symbol ``x`` left of it then merges differently only if the pair (x, y') is merged after
        the change to ``y'`` (y itself, y merged with its right neighbour, or a symbol built on
        y): a lower-ranked change would have been undone first. So a difference spreads left
        only along a chain of pairs ... (a, b), (b, c), (c, d) ... whose ranks fall from left to
        right, or through a symbol built by a lower-ranked merge; the longest such chain, in
        bytes, bounds how far back a cut reaches. One pass over the merges in rank order."""
        producer = {m: r for r, m in enumerate(self.merged_id)}
        order = sorted(self.rank.items(), key=lambda kv: kv[1])
        n = self.id_len
        reach_right: dict[int, int] = {}  # symbol -> longest chain (bytes from its start) of a pair it starts
        reach_built: dict[int, int] = {}  # merged symbol -> the chain of the pair that built it
        longest = 0
        for (x, y), r in order:
            if producer.get(x, -1) >= r or producer.get(y, -1) >= r:
                return None  # a merge uses a symbol made by a later merge: no creation order
            f = n[x] + max(n[y], reach_right.get(y, 0), reach_built.get(y, 0))
            if f > reach_right.get(x, 0):
                reach_right[x] = f
            reach_built[self.merged_id[r]] = f
            longest = max(longest, f)
        return longest + self.max_token_bytes  # one token's length more, as a margin


@functools.lru_cache(maxsize=None)
def _load_tables(path: str | None) -> _Tables:
    if path is None:
        data = resources.files("clipforge").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        data = Path(path).read_bytes()
    return _Tables(gzip.decompress(data).decode("utf-8"))


def clean_text(text: str) -> str:
    """OpenAI's text normalisation: ftfy, HTML unescape twice, single spaces, stripped, lowercase."""
    if text.isascii() and text.isprintable() and "&" not in text:
        # ftfy and html.unescape are the identity here (no entities, controls, or non-ASCII).
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    """Text -> CLIP token ids. ``tok(texts)`` returns a LongTensor [N, context_length].

    ``vocab_path`` points to another gzipped merges file of the same layout (default: the vendored
    OpenAI vocabulary).
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH, vocab_path: str | Path | None = None):
        self._vocab_path = None if vocab_path is None else str(vocab_path)
        self._t = _load_tables(self._vocab_path)
        self.context_length = _check_context_length(context_length)
        self.vocab_size = self._t.vocab_size
        self.sot_token_id = self._t.special[SPECIAL_TOKENS[0]]
        self.eot_token_id = self._t.special[SPECIAL_TOKENS[1]]
        self.pad_token_id = PAD_ID
        self._chunk_cache: dict[str, list[int]] = {}
        self._piece_cache: dict[str, list[int]] = {}
        self.max_cache = _MAX_CACHE

    def __getstate__(self) -> dict:
        # Pickled for worker processes: send the settings, not the tables or the caches.
        return {"context_length": self.context_length, "vocab_path": self._vocab_path, "max_cache": self.max_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["context_length"], state["vocab_path"])
        self.max_cache = state["max_cache"]

    # -- encoding ---------------------------------------------------------------------------

    def _bpe(self, raw: bytes, end: bool = True) -> list[int]:
        """Ids of one regex piece's UTF-8 bytes, merged pair by pair, lowest rank first. ``end``:
        the last byte ends the word (``</w>``); not so for a prefix of a cut piece."""
        t = self._t
        word = [t.byte_id[b] for b in raw[:-1]]
        word.append((t.byte_end_id if end else t.byte_id)[raw[-1]])
        rank_get = t.rank.get
        # ranks[i] is the merge rank of (word[i], word[i+1]); distinct pairs have distinct ranks.
        ranks = list(map(rank_get, zip(word, word[1:]), repeat(_NO_MERGE)))
        while ranks:
            best = min(ranks)
            if best == _NO_MERGE:
                break
            # Merging the leftmost occurrence, then looking again, replaces the occurrences
            # left to right without overlap, as OpenAI's pass over the word does: a merged symbol
            # never forms the same pair again, so only its two neighbouring pairs change.
            j = ranks.index(best)
            merged = t.merged_id[best]
            word[j] = merged
            del word[j + 1], ranks[j]
            if j:
                ranks[j - 1] = rank_get((word[j - 1], merged), _NO_MERGE)
            if j < len(ranks):
                ranks[j] = rank_get((merged, word[j + 1]), _NO_MERGE)
        return word

    def _encode_chunk(self, chunk: str, need: int = sys.maxsize) -> tuple[list[int], bool]:
        """Ids of a space-free chunk, and whether they are all of its ids: encoding stops once
        ``need`` ids are reached (the rest would be cut off), and a long piece may be cut."""
        ids: list[int] = []
        cache, special = self._piece_cache, self._t.special
        pieces = self._t.pattern.findall(chunk)
        for n, piece in enumerate(pieces, 1):
            if piece in special:  # only an exact special-token string is special
                ids.append(special[piece])
            else:
                got = cache.get(piece)
                if got is None:
                    raw = piece.encode("utf-8")
                    if len(raw) > self._first_cut(need - len(ids)):
                        got, whole = self._bpe_first(raw, need - len(ids))
                        if not whole:  # the first ids of a piece that gives more than needed
                            ids += got
                            return ids, False
                    else:
                        got = self._bpe(raw)
                    if len(cache) >= self.max_cache:
                        cache.clear()
                    cache[piece] = got
                ids.extend(got)
            if len(ids) >= need:
                return ids, n == len(pieces)
        return ids, True

    def _first_cut(self, need: int) -> int:
        """Pieces longer than this many bytes are cut (``_bpe_first``): a first guess of ~6 bytes
        per id still needed, plus the lookahead; no cut at all without a lookahead."""
        reach = self._t.lookahead
        return sys.maxsize if reach is None or need >= sys.maxsize // 8 else 6 * need + reach

    def _bpe_first(self, raw: bytes, need: int) -> tuple[list[int], bool]:
        """The first ``need`` ids of a long piece, from merging a prefix of it (see module doc):
        the ids that end ``lookahead`` bytes or more before the prefix's end. The prefix doubles
        while it holds fewer; ``need * max_token_bytes + lookahead`` bytes always hold enough (no
        id covers more than ``max_token_bytes``), so the work is bounded by that length. Returns
        ``(ids, whole)``: ``whole`` when the prefix grew to the whole piece, whose ids (all of
        them, perhaps fewer than ``need``) are then returned."""
        t = self._t
        reach, lengths = t.lookahead, t.id_len
        size = self._first_cut(need)
        while size < len(raw):
            word = self._bpe(raw[:size], end=False)
            kept, end = [], 0
            for i in word:
                end += lengths[i]
                if end > size - reach or len(kept) == need:
                    break
                kept.append(i)
            if len(kept) == need:
                return kept, False
            size *= 2
        return self._bpe(raw), True

    def _encode(self, text: str, limit: int = sys.maxsize) -> list[int]:
        """Ids of ``text`` without start/end tokens; stops early once ``limit`` ids are reached
        (then only the first ``limit`` ids are exact: the text's end may be cut)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        ids: list[int] = []
        cache = self._chunk_cache
        cache_get = cache.get
        for chunk in clean_text(text).split(" "):
            got = cache_get(chunk)
            if got is None:
                got, whole = self._encode_chunk(chunk, limit - len(ids))
                if whole:
                    if len(cache) >= self.max_cache:
                        cache.clear()
                    cache[chunk] = got
            ids += got
            if len(ids) >= limit:  # the rest would be cut off anyway
                break
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        return self._encode(text)

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """LongTensor [N, context_length]: start id, text ids, end id, then zeros.

        Overlong texts keep their first ``context_length - 2`` ids, so the end id is still last
        (OpenAI's truncation); with ``truncate=False`` they raise ``TextTooLongError`` (a ``ValueError``).
        """
        ctx = self.context_length if context_length is None else _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        sot, eot = self.sot_token_id, self.eot_token_id
        keep = ctx - 2  # text ids that fit between start and end
        rows = []
        for text in texts:
            ids = self._encode(text, limit=keep + 1)  # one more than fits tells "too long"
            if len(ids) > keep:
                if not truncate:
                    raise TextTooLongError(
                        f"text encodes to more than {keep} tokens, the most that fit in context length {ctx} "
                        f"with start and end tokens (pass truncate=True to cut it): {text[:80]!r}"
                    )
                del ids[keep:]
            rows.append([sot, *ids, eot])
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # [N]
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        out = np.zeros((len(rows), ctx), dtype=np.int64)  # [N, ctx], PAD_ID == 0
        out[np.arange(ctx) < lengths[:, None]] = flat  # row-major boolean fill keeps each row's order
        return torch.from_numpy(out)

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of a 1-D id sequence, as OpenCLIP decodes it: each word followed by a space."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one sequence of ids, got an array of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        table, n = self._t.id_bytes, self.vocab_size
        parts = []
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
            parts.append(table[i])
        return b"".join(parts).decode("utf-8", errors="replace").replace("</w>", " ")


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    return context_length


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the vendored vocabulary, built on first use."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True) -> torch.Tensor:
    """OpenAI-identical token ids: LongTensor [N, context_length] (see ``Tokenizer.__call__``)."""
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)


def decode(ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
    return default_tokenizer().decode(ids)
