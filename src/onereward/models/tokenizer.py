"""A word-level tokenizer trained locally on the prompt vocabulary (no hub downloads).

Prompts are split into words; the quoted text of a text-rendering prompt is split into characters, so
`text "A7"` becomes `text A 7` and the model sees each glyph it must draw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[EMPTY]"]
_QUOTED = re.compile(r'"([^"]*)"')


def prompt_words(prompt: str) -> list[str]:
    words: list[str] = []
    pos = 0
    for m in _QUOTED.finditer(prompt):
        words += prompt[pos : m.start()].split()
        words += list(m.group(1).replace(" ", ""))
        pos = m.end()
    words += prompt[pos:].split()
    return [w.lower() if w.isascii() and len(w) > 1 else w for w in words] or ["[EMPTY]"]


def build_tokenizer(prompts: Iterable[str], max_length: int):
    """A PreTrainedTokenizerFast over every word seen in `prompts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({w for p in prompts for w in prompt_words(p)} - set(SPECIALS))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length, padding_side="right")


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def encode(tokenizer, prompts: list[str], max_length: int):
    """input_ids and attention_mask tensors for prompts (an empty prompt is the [EMPTY] token)."""
    texts = [" ".join(prompt_words(p)) for p in prompts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
