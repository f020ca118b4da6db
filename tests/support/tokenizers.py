"""Tiny tokenizers of each family, trained here on a few sentences (offline, in well under a second),
written as the Hugging Face files a checkpoint carries beside its weights.

- ``sentencepiece_dir``: SigLIP's ``spiece.model`` (a SentencePiece unigram model, trained with
  the sentencepiece library) + ``tokenizer_config.json`` naming ``SiglipTokenizer``;
- ``gemma_dir``: a Gemma-style byte-fallback BPE ``tokenizer.json`` (SigLIP 2), built with the
  tokenizers library;
- ``unigram_dir``: a SentencePiece-style Unigram ``tokenizer.json`` with ``</s>`` appended (mT5 /
  XLM-R / XLM-V style: MetaCLIP 2 worldwide), built with tokenizers;
- ``wordpiece_dir``: BERT's uncased WordPiece (CLIPA), built with tokenizers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = [
    "A photo of a cat.", "a dog on the grass", "Two red cars parked, side by side!",
    "the quick brown fox jumps over the lazy dog", "an image of a bird in the sky", "A PAINTING of a house",
    "café crème brûlée", "people walking in the city at night", "a close-up photo of the large object",
    "itap of my small toy", "a sketch of a bicycle_wheel", "Ünïcödé text, with punctuation; and (brackets)",
] * 4

# Cases, punctuation, underscores, entities, extra spaces, non-ASCII, empty and over-long texts.
TEXTS = [
    "A photo of a Cat!", "dogs &amp; cats_together", "", "  spaced   out\ttext  ",
    "the quick brown fox jumps over the lazy dog " * 4, "café ☃ 日本", "A PAINTING, of a house.", "x",
]


def sentencepiece_dir(root: Path) -> Path:
    import sentencepiece as spm

    d = root / "siglip_tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # SigLIP's layout: </s> is the end and the padding token (id 1), <unk> 2; no beginning token.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=150, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, minloglevel=2)
    (d / "spiece.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer",
                                                         "model_max_length": 64}))
    return d


def gemma_dir(root: Path, tokenizer_class: str = "GemmaTokenizer") -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    d = root / "gemma_tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
        "unk_token": "<unk>", "model_max_length": 64}))
    return d


def unigram_dir(root: Path, eos_id: int = 1) -> Path:
    """mT5's special ids with ``eos_id=1`` (<pad> 0, </s> 1, <unk> 2), XLM-R's / XLM-V's with 2
    (<s> 0, <pad> 1, </s> 2, <unk> 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = root / f"unigram_tokenizer_eos{eos_id}"
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"] if eos_id == 1 else ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.token_to_id("</s>") == eos_id
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos_id)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    return d


def wordpiece_dir(root: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    d = root / "bert_tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                              show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return d
