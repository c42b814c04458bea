"""Word-level fast tokenizers over the synthetic scenes' vocabulary (`blip2.data.scenes`).

They are the tokenizers of the *tiny* models: the random tiny Q-Former and LLM of `blip2.config.tiny_config`
(vocabularies of 99 and 98 ids) that tests, benchmarks and the demo's ``--quick`` mode build. Real models use
their own tokenizers (MiniLM's WordPiece for the Q-Former, the LLM's from its checkpoint).
"""

from __future__ import annotations

from typing import Any

WORDS = (
    "a an the of and to in on with is are there what how many color shape where left right top bottom center "
    "red green blue yellow purple orange white black circle square triangle star small large one two three "
    "yes no photo picture shapes shape question answer : ? . ,"
).split()


def word_tokenizer(specials: dict[str, int], vocab_size: int) -> Any:
    """A whitespace word-level fast tokenizer over `WORDS` (ids after the special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < vocab_size:  # filler words, so that every id a tiny model emits decodes to something
        vocab[f"w{len(vocab)}"] = len(vocab)
    unk = "<unk>" if "<unk>" in specials else "[UNK]"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk)


def tiny_llm_tokenizer() -> Any:
    """The tiny LLM's tokenizer: ``<s>`` (BOS) 0, ``<pad>`` 1, ``</s>`` (EOS) 2; adds no special tokens itself."""
    tok = word_tokenizer({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, vocab_size=98)
    tok.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"})
    tok.padding_side = "left"
    return tok


def tiny_bert_tokenizer() -> Any:
    """The tiny Q-Former's tokenizer: BERT's layout, ``[CLS] text [SEP]``, ``[PAD]`` 0."""
    tok = word_tokenizer({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}, vocab_size=99)
    tok.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tok


BERT_WORD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_word_tokenizer(words: list[str]) -> Any:
    """A lowercasing word-level tokenizer in BERT's layout over ``words``: ``[PAD]`` 0, ``[UNK]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]``, the words in order, then ``[DEC]`` (the Q-Former's ITG start token) as the last id;
    ``[CLS] text [SEP]`` like BERT's. Words and runs of punctuation are tokens (whitespace pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(BERT_WORD_SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    vocab["[DEC]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        additional_special_tokens=["[DEC]"],
    )
