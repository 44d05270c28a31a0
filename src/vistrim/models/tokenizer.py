"""A small word-level tokenizer for the models vistrim builds itself (tiny test model, test-bed).

Real checkpoints bring their own tokenizer; this one exists so that models built from a config can
be saved with a complete processor and loaded back with ``from_pretrained`` like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"


def word_level_tokenizer(
    words: Iterable[str], specials: Iterable[str] = (), named: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """Lower-cased word/punctuation tokenizer over ``words`` plus the special tokens.

    Ids 0..4 are ``<pad> <unk> <s> </s> <image>``; then ``specials`` (a family's own placeholder
    and boundary tokens, e.g. ``<|image_pad|>``), then the words in first-seen order, so the
    vocabulary is deterministic for a deterministic word list. ``named`` sets tokenizer attributes
    such as ``{"image_token": "<|image_pad|>"}`` that processors read (``image_token`` defaults
    to ``<image>``).
    """
    specials = [t for t in specials if t not in SPECIAL_TOKENS]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *specials])}
    for word in words:
        word = word.lower()
        if word and word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN, **(named or {})},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *specials]})
    return tokenizer
