"""Each family's tokenizer (``clipforge.tokenizer_for``) against transformers' own tokenizer classes
and open_clip's HFTokenizer, on tokenizer files built inside the test (tests/support/tokenizers.py):
SigLIP's SentencePiece model, SigLIP 2's Gemma BPE, a Unigram tokenizer.json (mT5 / XLM-V style,
MetaCLIP 2 worldwide) and BERT's WordPiece with [SEP] stripped (CLIPA). Nothing is downloaded."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import transformers  # noqa: E402
from support.tokenizers import (  # noqa: E402
    TEXTS,
    gemma_dir,
    sentencepiece_dir,
    unigram_dir,
    wordpiece_dir,
)

import clipforge  # noqa: E402
from clipforge.config import ClipConfig, TextConfig  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model.interop.openclip_text import text_from_openclip  # noqa: E402

CTX = 64


def ours(directory, clean: str, strip_sep: bool = False, context: int = CTX):
    text = TextConfig(context_length=context, hf_tokenizer_name=str(directory), tokenizer_clean=clean,
                      tokenizer_strip_sep=strip_sep)
    return clipforge.tokenizer_for(ClipConfig(text=text))


def hf_ids(tokenizer, context: int = CTX) -> torch.Tensor:
    """transformers' own call, as its model cards show it (fixed-length padding for SigLIP)."""
    return tokenizer(TEXTS, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids


def openclip_ids(directory, context: int = CTX, **kwargs) -> torch.Tensor:
    return open_clip.tokenizer.HFTokenizer(str(directory), context_length=context, **kwargs)(TEXTS)


def test_siglip_sentencepiece_equals_siglip_tokenizer_and_openclip(tmp_path):
    pytest.importorskip("sentencepiece")
    d = sentencepiece_dir(tmp_path)
    ref = transformers.SiglipTokenizer.from_pretrained(d)
    got = ours(d, "none")(TEXTS)
    assert got.shape == (len(TEXTS), CTX) and got.dtype == torch.long
    assert torch.equal(got, hf_ids(ref))
    assert (got[:, -1] == ref.pad_token_id).any(), "short texts are padded to the context length"
    # OpenCLIP's SigLIP configs: clean='canonicalize' (lower case, no punctuation)
    assert torch.equal(ours(d, "canonicalize")(TEXTS), openclip_ids(d, clean="canonicalize"))


def test_siglip2_gemma_equals_transformers_and_openclip(tmp_path):
    d = gemma_dir(tmp_path, tokenizer_class="GemmaTokenizer")
    assert torch.equal(ours(d, "none")(TEXTS), hf_ids(transformers.GemmaTokenizerFast.from_pretrained(d)))
    assert torch.equal(ours(d, "canonicalize")(TEXTS), openclip_ids(d, clean="canonicalize"))
    # transformers' Siglip2Tokenizer is Gemma's with SigLIP 2's lower-casing built in
    d2 = gemma_dir(tmp_path / "s2", tokenizer_class="Siglip2Tokenizer")
    assert torch.equal(ours(d2, "none")(TEXTS), hf_ids(transformers.Siglip2Tokenizer.from_pretrained(d2)))
    lowered = [t.lower() for t in TEXTS]
    assert not torch.equal(ours(d, "none")(TEXTS), ours(d, "none")(lowered)), "the test texts have upper case"


def test_unigram_worldwide_equals_fast_tokenizer_and_openclip(tmp_path):
    d = unigram_dir(tmp_path)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    got = ours(d, "none", context=16)(TEXTS)
    assert torch.equal(got, hf_ids(ref, 16))
    eos = ref.eos_token_id
    assert ((got == eos).sum(1) == 1).all(), "every row keeps one end token, truncated rows too"
    # ViT-H-14-worldwide (XLM-V): OpenCLIP's default clean; ViT-L-14-worldwide (mT5): canonicalize
    assert torch.equal(ours(d, "whitespace", context=16)(TEXTS), openclip_ids(d, 16))
    assert torch.equal(ours(d, "canonicalize", context=16)(TEXTS), openclip_ids(d, 16, clean="canonicalize"))


def test_clipa_wordpiece_strips_sep_as_openclip(tmp_path):
    d = wordpiece_dir(tmp_path)
    ref = transformers.BertTokenizerFast.from_pretrained(d)
    assert torch.equal(ours(d, "none", context=16)(TEXTS), hf_ids(ref, 16))
    got = ours(d, "whitespace", strip_sep=True, context=16)(TEXTS)
    assert torch.equal(got, openclip_ids(d, 16, strip_sep_token=True))
    assert not (got == ref.sep_token_id).any()


def test_openclip_tokenizer_kwargs_set_the_text_config():
    t, bad = text_from_openclip({"hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "context_length": 64,
                                 "tokenizer_kwargs": {"clean": "canonicalize"}})
    assert not bad and t.hf_tokenizer_name == "timm/ViT-B-16-SigLIP" and t.tokenizer_clean == "canonicalize"
    t, bad = text_from_openclip({"hf_tokenizer_name": "bert-base-uncased",
                                 "tokenizer_kwargs": {"strip_sep_token": True}})
    assert not bad and t.tokenizer_strip_sep and t.tokenizer_clean == "whitespace"
    _, bad = text_from_openclip({"tokenizer_mode": "clips", "tokenizer_kwargs": {"language": "fr"}})
    assert len(bad) == 2, bad


def test_default_is_clips_bpe_and_family_tokenizer_pickles(tmp_path):
    bpe = clipforge.tokenizer_for(ClipConfig(text=TextConfig(context_length=32)))
    assert torch.equal(bpe(TEXTS), open_clip.tokenize(TEXTS, context_length=32))
    tok = ours(unigram_dir(tmp_path), "canonicalize", context=16)
    again = pickle.loads(pickle.dumps(tok))  # DataLoader workers receive it pickled
    assert torch.equal(again(TEXTS), tok(TEXTS))
    assert tok([]).shape == (0, 16)


def test_a_tokenizer_that_cannot_be_read_is_a_one_line_error(tmp_path):
    empty = tmp_path / "no_tokenizer_here"
    empty.mkdir()
    for name in (str(empty), str(tmp_path / "missing" / "dir")):
        with pytest.raises(CheckpointError, match="tokenizer") as e:
            ours(name, "none")
        assert "\n" not in str(e.value)
