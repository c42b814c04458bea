"""Caption and question cleaning as the authors' data pipeline does it (LAVIS ``blip_processors.py``).

LAVIS passes every pretraining caption through ``BlipCaptionProcessor.pre_caption`` and every VQA question
through ``BlipQuestionProcessor.pre_question`` before tokenisation. For a cased LLM such as OPT this matters:
a model trained on raw captions learns capitals and final full stops that the authors' model never saw.

`clean_caption` (``pre_caption``), step by step:

1. lower-case;
2. each character of ``CLEANED_PUNCTUATION`` (the regex class ``[.!"()*#:;~]`` in LAVIS: full stop,
   exclamation mark, double quote, both parentheses, asterisk, hash, colon, semicolon, tilde) becomes a space;
   commas, apostrophes, question marks, hyphens and slashes stay;
3. every run of two or more whitespace characters becomes one space (a single tab or newline stays);
4. trailing newlines, then leading and trailing spaces are removed;
5. at most ``max_words`` (50) words, counted by splitting on single spaces.

`clean_question` (``pre_question``): lower-case, the same characters removed (not replaced by a space),
trailing spaces removed, at most ``max_words`` words.

`clean_captions` applies `clean_caption` to a training dataset's items; the recipes' ``data.clean_captions``
switch calls it (on in the paper recipes, off by default).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch.utils.data import Dataset, IterableDataset

__all__ = ["CLEANED_PUNCTUATION", "MAX_WORDS", "clean_caption", "clean_question", "clean_captions"]

CLEANED_PUNCTUATION = '.!"()*#:;~'
MAX_WORDS = 50  # LAVIS's default ``max_words`` for captions and questions
_PUNCTUATION = re.compile("[" + re.escape(CLEANED_PUNCTUATION) + "]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _first_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def clean_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS's caption cleaning (see the module docstring): ``'A Dog (brown).'`` → ``'a dog brown'``."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    return _first_words(text, max_words)


def clean_question(question: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS's VQA question cleaning: ``'What color is it?'`` → ``'what color is it?'``."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    text = _PUNCTUATION.sub("", question.lower()).rstrip(" ")
    return _first_words(text, max_words)


def _clean_item(item: Any, max_words: int) -> Any:
    """A dataset item with its ``text`` (and ``captions``) cleaned; skipped samples pass through."""
    if not isinstance(item, Mapping) or "text" not in item:
        return item
    out = {**item, "text": clean_caption(str(item["text"]), max_words)}
    if isinstance(item.get("captions"), list):
        out["captions"] = [clean_caption(str(c), max_words) for c in item["captions"]]
    return out


class _CleanedMap(Dataset):
    """A map-style dataset whose items' captions are cleaned (length, ``set_epoch`` and attributes pass through)."""

    def __init__(self, dataset: Any, max_words: int) -> None:
        self.dataset, self.max_words = dataset, max_words

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _clean_item(self.dataset[index], self.max_words)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found on the wrapper
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _CleanedStream(IterableDataset):
    """A streaming dataset (e.g. `WebDatasetShards`) whose items' captions are cleaned."""

    def __init__(self, dataset: Any, max_words: int) -> None:
        self.dataset, self.max_words = dataset, max_words

    def __iter__(self) -> Iterator[Any]:
        return (_clean_item(item, self.max_words) for item in self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def clean_captions(dataset: Any, max_words: int = MAX_WORDS) -> Any:
    """``dataset`` with `clean_caption` applied to every item's ``text`` (and ``captions``): a map-style
    dataset stays map-style, a streaming one streaming."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    if isinstance(dataset, IterableDataset):
        return _CleanedStream(dataset, max_words)
    return _CleanedMap(dataset, max_words)
