"""Token healing: a prompt may end inside what the tokenizer would merge.

Byte-level BPE writes a newline and the next line's indent as one token ("\\n   "),
and a space with the word after it (" return"). A prompt that ends in "\\n" or in
half an identifier therefore ends on a token boundary that never occurs inside
such text, and the model, which has only seen whole merges, continues it badly.

The usual cure (as the guidance library and transformers' `token_healing` do): take
the prompt's last token back, and let the first generated position choose only
among the tokens whose text starts with the removed text, on every denoising pass.
The committed text then starts with the removed text; the API returns what follows
it, so the user sees a continuation of exactly the prompt they gave.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Healing:
    text: str  # the removed text: the prompt's last token
    ids: np.ndarray  # int32: the ids allowed at the first canvas position


def token_texts(tokenizer) -> list[str]:
    """Every id's text (special tokens as empty strings); cached per tokenizer
    (by its `tokenizers` backend: the wrapper is a dataclass, not hashable)."""
    key = tokenizer.backend
    if key not in _TEXTS:
        special = tokenizer.special_token_ids
        _TEXTS[key] = [
            "" if i in special else tokenizer.decode([i])
            for i in range(tokenizer.vocab_size)
        ]
    return _TEXTS[key]


def allowed_mask(ids: np.ndarray, vocab: int, head: int | None) -> np.ndarray:
    """[width] bool over one pass's logits, True at the allowed ids; the width is a
    drafter plan's head (`head`) or the vocabulary."""
    mask = np.zeros(head or vocab, bool)
    ids = np.asarray(ids)
    mask[ids[ids < mask.size]] = True
    return mask


def strip_healed(text: str, healed: str) -> tuple[str, str]:
    """(text without the healed text it starts with, what of `healed` is still to
    come): streamed text may hold only part of it in its first chunk."""
    cut = len(healed) - len(healed.removeprefix(text[: len(healed)]))
    return text[cut:], healed[cut:]


def heal(tokenizer, ids: list[int]) -> tuple[list[int], Healing | None]:
    """(the prompt ids without their last token, the healing), or the ids unchanged
    and None when the last token is special or the only one, or when no other token
    extends it (nothing to heal)."""
    if len(ids) < 2 or ids[-1] in tokenizer.special_token_ids:
        return ids, None
    texts = token_texts(tokenizer)
    removed = texts[ids[-1]]
    allowed = [i for i, t in enumerate(texts) if t and t.startswith(removed)]
    if not removed or allowed == [ids[-1]]:
        return ids, None
    return ids[:-1], Healing(removed, np.asarray(allowed, np.int32))
