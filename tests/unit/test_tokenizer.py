"""Tokenizer behaviour: special ids, padding, truncation, errors, decoding, caching, laziness."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch

import clipforge
from clipforge.errors import ClipforgeError
from clipforge.model.tokenizer import EOT_ID, SOT_ID, TextTooLongError, Tokenizer, decode, tokenize

# Golden ids (OpenAI's vocabulary, checked against OpenCLIP when they were recorded).
GOLDEN = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A Photo of a CAT.": [320, 1125, 539, 320, 2368, 269],
    "it's 2 dogs &amp; 1 café!": [585, 568, 273, 3255, 261, 272, 15304, 256],
    "Ünïcödé 日本語 😀": [6522, 77, 35689, 66, 7255, 67, 4166, 39121, 44353, 34002, 508, 7334],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_vendored_vocab_is_openai_file():
    data = resources.files("clipforge").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert resources.files("clipforge").joinpath("assets/LICENSE-openai-clip.txt").read_text().count("OpenAI") >= 2


def test_special_ids_and_vocab_size(tok):
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49408, 49406, 49407, 0)
    assert (SOT_ID, EOT_ID) == (49406, 49407)
    assert tok.decode([49406, 49407]) == "<start_of_text><end_of_text>"


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(tok, text):
    assert tok.encode(text) == GOLDEN[text]
    row = tokenize(text)[0]
    n = len(GOLDEN[text])
    assert row[: n + 2].tolist() == [SOT_ID, *GOLDEN[text], EOT_ID]
    assert not row[n + 2 :].any()  # padded with zeros


def test_shape_dtype_and_padding():
    out = tokenize(["a photo of a cat", "", "   \t\n"])
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out[0, :7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID] and not out[0, 7:].any()
    for row in out[1:]:  # empty and whitespace-only texts: just the start and end ids
        assert row[:2].tolist() == [SOT_ID, EOT_ID] and not row[2:].any()
    assert tokenize("a photo of a cat").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)


def test_truncation_keeps_end_token_last():
    out = tokenize(["cat " * 80, "cat " * 75, "cat " * 76])
    assert out[0].tolist() == [SOT_ID] + [2368] * 75 + [EOT_ID]
    assert out[1].tolist() == [SOT_ID] + [2368] * 75 + [EOT_ID]  # exactly full, nothing cut
    assert out[2].tolist() == out[0].tolist()


def test_truncate_false_raises_on_overlong_only():
    assert tokenize("cat " * 75, truncate=False)[0, -1] == EOT_ID  # exactly fits
    with pytest.raises(ValueError, match="context length 77"):
        tokenize(["ok", "cat " * 76], truncate=False)
    with pytest.raises(ClipforgeError):  # an input error the CLI prints as one line
        tokenize("cat " * 20, context_length=10, truncate=False)
    assert issubclass(TextTooLongError, ValueError)


@pytest.mark.parametrize("context_length", [2, 5, 16, 200])
def test_context_length_option(context_length):
    out = tokenize(["a photo of a cat", "cat " * 300], context_length=context_length)
    assert out.shape == (2, context_length)
    assert (out[:, 0] == SOT_ID).all()
    assert out[1, -1] == EOT_ID and (out[1] != 0).all()  # the long text fills the row
    assert Tokenizer(context_length=context_length)("a cat").shape == (1, context_length)


@pytest.mark.parametrize("bad", [0, 1, -5, 7.0, True])
def test_bad_context_length(bad):
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a cat", context_length=bad)


def test_non_string_input_raises():
    with pytest.raises(TypeError, match="str"):
        tokenize(["a cat", 3])
    with pytest.raises(TypeError):
        tokenize(None)


def test_decode(tok):
    ids = tok.encode("Hello,   World!  it's &amp;")
    assert tok.decode(ids) == "hello , world ! it 's & "
    assert decode(torch.tensor(ids)) == decode(np.array(ids)) == tok.decode(ids)
    assert tok.decode([]) == ""
    assert tok.decode(tok.encode("日本語 😀")) == "日本語 😀 "
    assert tok.decode([172, 320]) == "\ufffda "  # id 172 is the lone byte 0xF0: replaced, not an error
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(tokenize(["a", "b"]))


def test_call_matches_tokenize_and_public_api(tok):
    texts = ["a dog", "Two CATS on a mat!!", "&#39;quoted&#39;"]
    assert torch.equal(tok(texts), tokenize(texts))
    assert torch.equal(clipforge.tokenize(texts), tokenize(texts))
    assert torch.equal(tok(texts, context_length=8), tokenize(texts, context_length=8))


def test_caches_bounded_and_transparent():
    small = Tokenizer()
    small.max_cache = 4
    texts = [f"word{i} another{i % 7} pic-{i}.jpg" for i in range(50)]
    first = small(texts)
    assert len(small._chunk_cache) <= 4 and len(small._piece_cache) <= 4
    assert torch.equal(first, small(texts)) and torch.equal(first, tokenize(texts))


def test_pickles_small_and_equal(tok):
    tok("a photo of a cat")  # fill the caches: they are not pickled
    blob = pickle.dumps(tok)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert torch.equal(again(["a photo of a cat"], context_length=9), tok(["a photo of a cat"], context_length=9))


@pytest.mark.slow
def test_nothing_built_at_import():
    code = (
        "import clipforge.model.tokenizer as t\n"
        "assert t._load_tables.cache_info().currsize == 0 and t.default_tokenizer.cache_info().currsize == 0\n"
        "t.tokenize('a cat')\n"
        "assert t._load_tables.cache_info().currsize == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
