"""clipforge's tokenizer gives the ids of OpenCLIP's (OpenAI's algorithm) on a large, nasty corpus."""

from __future__ import annotations

import random

import pytest
import torch

from clipforge.model.tokenizer import Tokenizer, clean_text, decode, tokenize

oc_tok = pytest.importorskip("open_clip.tokenizer")

WORDS = (
    "a photo of the cat dog on in with and at by two red blue small large old new man woman child car "
    "tree house beach sunset city street night view close-up portrait vintage illustration vector icon "
    "logo background white black isolated wooden table kitchen garden mountain river sky cloud flower "
    "bicycle coffee cup laptop phone book shirt dress shoes t-shirt sale free download stock image"
).split()
CONTRACTIONS = ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "it’s",
                "o'clock", "rock'n'roll", "'s", "''", "'ſ", "'S'T'RE", "'ll've"]
SCRIPTS = [  # (first, last) code points to draw letters from
    (0x00C0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0530, 0x058F), (0x05D0, 0x05EA),
    (0x0600, 0x06FF), (0x0900, 0x097F), (0x0B80, 0x0BFF), (0x0E00, 0x0E7F), (0x10A0, 0x10FF),
    (0x1200, 0x137F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1E00, 0x1EFF),
    (0xFF01, 0xFF5E),  # fullwidth forms: ftfy folds them to ASCII
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "🧑🏿‍💻", "☕", "🐈‍⬛", "🫠", "1️⃣", "©", "™", "✔︎"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&amp;#39;",
            "&amp;quot;", "&eacute;", "&hellip;", "&#8217;", "&mdash;", "&copy;", "&#;", "&am", "&#x110000;",
            "&#xd800;", "&amp;amp;amp;", "&AMP;", "&notit;", "&#0;", "&#128;"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u2000", "\u2028",
          "\u3000", "\u200b", "\u180e", "\ufeff"]
PUNCT = ["!!!", "???", "...", "---", "*-*", "(", ")", "[x]", "{}", "#1", "@user", "#hashtag", "$9.99",
         "100%", "+/-", "<b>", "</w>", "<br/>", "~~~", "¿¡", "«»", "“”", "—", "…", "/\\", "|", "^_^", ":-)"]
SPECIALS = ["<start_of_text>", "<end_of_text>", "<|endoftext|>", "<|startoftext|>", "<END_OF_TEXT>",
            "<ſtart_of_text>", "x<end_of_text>y"]
URLS = ["https://example.com/path?q=1&x=2", "http://www.test.org/a_b-c.jpg", "ftp://x.y/z",
        "user.name+tag@mail.example.co.uk", "IMG_20230101_123456.JPG", "www.example.com/~me/index.html"]
GREEK_CAPS = ["ΟΔΟΣ", "ΑΣ ΣΑ", "ΣΊΣΥΦΟΣ.", "İstanbul", "ǅ", "ß", "ẞ", "ﬂubberiﬁc", "K"]


def _letters(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _mojibake(rng: random.Random, text: str) -> str:
    enc = rng.choice(["latin-1", "cp1252"])
    return text.encode("utf-8").decode(enc, errors="replace" if enc == "cp1252" else "strict")


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(16)
    if kind == 0:
        return rng.choice(CONTRACTIONS)
    if kind == 1:
        lo, hi = rng.choice(SCRIPTS)
        return _letters(rng, lo, hi, rng.randint(1, 8))
    if kind == 2:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
    if kind == 3:
        return rng.choice(ENTITIES) + rng.choice(["", "x", ";", " "])
    if kind == 4:
        base = rng.choice("aeiouncAEOZ")  # decomposed accents: ftfy normalises to NFC
        return base + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 3)))
    if kind == 5:
        return _mojibake(rng, rng.choice(["café", "naïve", "it’s", "“quoted”", "日本", "😀", "Größe", "€5"]))
    if kind == 6:
        return str(rng.randint(0, 10**rng.randint(1, 12))) + rng.choice(["", ".5", ",000", "th", "px", "x"])
    if kind == 7:
        return rng.choice(PUNCT)
    if kind == 8:
        return rng.choice(URLS)
    if kind == 9:
        return rng.choice(SPECIALS)
    if kind == 10:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))).decode("latin-1")
    if kind == 11:
        return chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
    if kind == 12:
        return rng.choice(GREEK_CAPS)
    if kind == 13:
        return "\x1b[31m" + rng.choice(WORDS) + "\x1b[0m"  # terminal escapes, removed by ftfy
    word = rng.choice(WORDS)
    return word.upper() if kind == 14 else word.capitalize()


def nasty_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\t\n ", "\u3000\u00a0", "&amp;", "&", "a", "A", "'", "0", "\x00", "\ufffd", "</w>"]
    while len(texts) < n:
        mode = rng.random()
        if mode < 0.35:  # caption-like: mostly plain words with some nasty pieces
            parts = [rng.choice(WORDS) if rng.random() < 0.7 else _piece(rng) for _ in range(rng.randint(1, 25))]
        elif mode < 0.75:  # dense nasty text
            parts = [_piece(rng) for _ in range(rng.randint(1, 12))]
        elif mode < 0.9:  # long: well past 77 tokens, exercises truncation
            parts = [_piece(rng) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(rng.randint(60, 200))]
        else:  # whitespace and punctuation soup
            parts = [rng.choice(SPACES + PUNCT + ENTITIES) for _ in range(rng.randint(0, 10))]
        glue = SPACES if rng.random() < 0.3 else [" "]
        texts.append("".join(p + rng.choice(glue if rng.random() < 0.9 else [""]) for p in parts))
    return texts


CORPUS = nasty_corpus(3000)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return oc_tok.tokenize(CORPUS)  # [N, 77]


@pytest.mark.slow
def test_corpus_is_nasty_enough(reference):
    assert len(CORPUS) == 3000
    assert sum(not t.isascii() for t in CORPUS) > 1500
    assert sum("&" in t for t in CORPUS) > 400
    lengths = (reference != 0).sum(dim=1)  # [N], start and end included
    assert (reference[:, -1] == 49407).sum() > 300  # truncated rows end with the end id
    assert (lengths == 2).sum() >= 10  # empty after cleaning


@pytest.mark.slow
def test_tokenize_ids_identical_to_open_clip(reference):
    got = tokenize(CORPUS)
    assert got.dtype == torch.long and got.shape == reference.shape
    bad = (got != reference).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} texts differ, first {CORPUS[bad[0]]!r}"
    assert torch.equal(tokenize(CORPUS), reference)  # again, now served from the caches


@pytest.mark.parametrize("context_length", [2, 3, 16, 100])
def test_context_lengths_identical_to_open_clip(context_length):
    texts = CORPUS[:400]
    assert torch.equal(tokenize(texts, context_length=context_length), oc_tok.tokenize(texts, context_length))


@pytest.mark.slow
def test_encode_and_clean_identical_to_simple_tokenizer():
    ref = oc_tok.SimpleTokenizer()
    tok = Tokenizer()
    tok.max_cache = 64  # tiny caches: clearing on overflow must not change any result
    for text in CORPUS[::3]:
        assert tok.encode(text) == ref.encode(text), text
        assert clean_text(text) == oc_tok._clean_lower(text), text


def test_decode_identical_and_round_trips():
    ref = oc_tok.SimpleTokenizer()
    tok = Tokenizer()
    for text in CORPUS[1::3]:
        ids = tok.encode(text)
        got = tok.decode(ids)
        assert got == ref.decode(ids)
        # Decoding gives back the bytes of every regex piece, each word followed by a space. The
        # regex skips a few characters (e.g. U+0345, which case-folds to a letter), so compare
        # with the pieces rather than the cleaned text; a literal "</w>" decodes to a space.
        cleaned = oc_tok._clean_lower(text)
        if "</w>" not in cleaned:
            pieces = ref.pat.findall(cleaned)
            assert got == "".join(p if p in ("<start_of_text>", "<end_of_text>") else p + " " for p in pieces)
    rng = random.Random(1)
    for _ in range(300):  # arbitrary id sequences, including cut UTF-8 and special ids
        ids = [rng.randrange(49408) for _ in range(rng.randint(0, 30))]
        assert decode(torch.tensor(ids, dtype=torch.long)) == ref.decode(ids)
