"""Needle-in-a-haystack samples: the fact format, disjoint train/eval needles, the training mix.

A *needle* is a random fact, "the pass key of <key> is <value>", hidden in a
*haystack* of ordinary corpus text; a question at the end repeats the fact's
opening up to the value, so that the value is the continuation to produce.
In bytes, a sample of ``length`` tokens is the concatenation of::

    haystack[:p]   "\\nThe pass key of Rotupa is #482913.\\n"  (the needle)
    haystack[p:h]  "\\nQ: the pass key of Rotupa is #"          (the question)
                   "482913."                                   (the answer)

``h = length - overhead`` is the haystack's share and ``p = round(depth * h)``,
so depth 0 puts the needle first and depth 1 right before the question. Keys
are three consonant-vowel syllables (six letters), values six digits, and the
answer ends with ``.``: a prediction is right only if it is the six digits
followed by the full stop, which makes exact-match scoring unambiguous.

Training and evaluation needles can never coincide: keys are split in two by the
parity of their CRC-32 (even for training, odd for evaluation), and the two sides
draw from different random streams (:data:`TRAIN_STREAM`, :data:`EVAL_STREAM`).

The training mix (:class:`~nsa_lab.data.mix.TrainingMix`) replaces a fraction of
training rows by retrieval units of random length built from that row's own text
(:func:`training_sample`), followed by the row's text continuing, so the question
sits at varying positions and every token is still ordinary next-token prediction.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nsa_lab.data.tokenizer import ByteTokenizer

NEEDLE_TEMPLATE = "\nThe pass key of {key} is #{value}.\n"
QUESTION_TEMPLATE = "\nQ: the pass key of {key} is #"
ANSWER_TEMPLATE = "{value}."
ANSWER_END = "."
KEY_SYLLABLES = 3
VALUE_DIGITS = 6
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Random-stream namespaces, mixed into every seed so that training and evaluation
# draw from unrelated streams whatever seeds the user picks.
TRAIN_STREAM = 0x7A1
EVAL_STREAM = 0xE7A1
SPLITS = ("train", "eval")
_TOKENIZER = ByteTokenizer()


@dataclass(frozen=True)
class NeedleFact:
    """One key/value fact; ``needle``, ``question`` and ``answer`` are its three texts."""

    key: str
    value: str

    @property
    def needle(self) -> str:
        return NEEDLE_TEMPLATE.format(key=self.key, value=self.value)

    @property
    def value_offset(self) -> int:
        """Token index of the value's first digit within ``needle`` (ASCII: one byte a char)."""
        return len(NEEDLE_TEMPLATE.split("{value}")[0].format(key=self.key))

    @property
    def question(self) -> str:
        return QUESTION_TEMPLATE.format(key=self.key)

    @property
    def answer(self) -> str:
        return ANSWER_TEMPLATE.format(value=self.value)


def key_split(key: str) -> str:
    """``train`` or ``eval``: which side of the fixed key partition ``key`` belongs to."""
    return SPLITS[zlib.crc32(key.encode("ascii")) & 1]


def random_fact(rng: np.random.Generator, split: str) -> NeedleFact:
    """A fact whose key lies in ``split``'s half of the key space, value uniform over digits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    while True:  # half of all keys qualify, so this takes two draws on average
        syllables = [
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(KEY_SYLLABLES)
        ]
        key = "".join(syllables).capitalize()
        if key_split(key) == split:
            break
    value = "".join(str(d) for d in rng.integers(0, 10, size=VALUE_DIGITS))
    return NeedleFact(key, value)


def stream_rng(stream: int, *entropy: int) -> np.random.Generator:
    """A generator for one draw of one stream (``TRAIN_STREAM``, ``EVAL_STREAM``...), seeded
    by ``entropy`` (seed, index, ...), so any draw can be recomputed on its own."""
    return np.random.default_rng([stream, *entropy])


def encode(text: str) -> np.ndarray:
    return np.asarray(_TOKENIZER.encode(text), dtype=np.int64)


# Every fact has the same byte length (fixed key and value lengths), so these are constants.
_EXAMPLE = NeedleFact("K" * 2 * KEY_SYLLABLES, "0" * VALUE_DIGITS)
ANSWER_TOKENS = len(encode(_EXAMPLE.answer))
OVERHEAD_TOKENS = len(encode(_EXAMPLE.needle + _EXAMPLE.question + _EXAMPLE.answer))


@dataclass(frozen=True)
class NeedleSample:
    """A sample's tokens and where its parts start (token indices)."""

    tokens: np.ndarray
    needle_start: int
    question_start: int
    answer_start: int

    @property
    def prompt(self) -> np.ndarray:
        """What the model is given: everything before the answer."""
        return self.tokens[: self.answer_start]


def answer_mask(inputs: Tensor) -> Tensor:
    """Bool ``[B, T]``: where the *target* of input position ``t`` is an answer token.

    Found by matching the question template (the key bytes are wildcards) in the
    inputs, so it needs no bookkeeping from the data pipeline and works on any batch.
    The answer's tokens are the targets of the question's last position and of the
    ``ANSWER_TOKENS - 1`` positions after it (the answer's own tokens, teacher-forced).
    """
    pattern = torch.from_numpy(encode(_EXAMPLE.question)).to(inputs.device)
    wildcard = torch.zeros(len(pattern), dtype=torch.bool, device=inputs.device)
    key_at = QUESTION_TEMPLATE.index("{key}")  # ASCII: character index == byte index
    wildcard[key_at : key_at + len(_EXAMPLE.key)] = True
    span = len(pattern)
    batch, length = inputs.shape
    mask = torch.zeros(batch, length, dtype=torch.bool, device=inputs.device)
    if length < span:
        return mask
    windows = inputs.unfold(1, span, 1)  # [B, T - span + 1, span]
    ends = ((windows == pattern) | wildcard).all(-1)  # question ending at t + span - 1
    starts = ends.nonzero()
    for offset in range(ANSWER_TOKENS):
        cols = starts[:, 1] + span - 1 + offset
        keep = cols < length
        mask[starts[keep, 0], cols[keep]] = True
    return mask


def haystack_tokens_needed(length: int) -> int:
    """Haystack tokens in a sample of ``length`` tokens (needle, question and answer excluded)."""
    if length <= OVERHEAD_TOKENS:
        raise ValueError(
            f"a needle sample needs more than {OVERHEAD_TOKENS} tokens "
            f"(needle + question + answer), not {length}"
        )
    return length - OVERHEAD_TOKENS


def needle_position(depth: float, haystack_len: int) -> int:
    """Token index of the needle's first byte for ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], not {depth}")
    return round(depth * haystack_len)


def build_sample(haystack: np.ndarray, fact: NeedleFact, depth: float, length: int) -> NeedleSample:
    """``length`` tokens: haystack text with ``fact``'s needle at ``depth``, question, answer.

    Uses the first ``length - OVERHEAD_TOKENS`` tokens of ``haystack``.
    """
    h = haystack_tokens_needed(length)
    if len(haystack) < h:
        raise ValueError(f"the haystack has {len(haystack)} tokens, {h} are needed")
    p = needle_position(depth, h)
    needle, question, answer = encode(fact.needle), encode(fact.question), encode(fact.answer)
    hay = np.asarray(haystack[:h], dtype=np.int64)
    tokens = np.concatenate([hay[:p], needle, hay[p:], question, answer])
    question_start = h + len(needle)
    return NeedleSample(tokens, p, question_start, question_start + len(question))


def training_sample(window: np.ndarray, rng: np.random.Generator, min_length: int) -> np.ndarray:
    """A training window made of retrieval units back to back, then its own text.

    While at least ``min_length`` tokens are left, a unit of length uniform in
    ``[min_length, tokens left]`` follows, its needle at a depth uniform in [0, 1]
    and its haystack the window's text, which continues where the last unit's
    haystack stopped. The first unit spans any length up to the whole window, so
    long-range retrieval is trained, and the later, shorter ones add answers.
    """
    size = len(window)
    parts, text_used, filled = [], 0, 0
    while size - filled >= min_length:
        length = int(rng.integers(min_length, size - filled + 1))
        fact = random_fact(rng, "train")
        unit = build_sample(window[text_used:], fact, float(rng.random()), length)
        parts.append(unit.tokens)
        text_used += haystack_tokens_needed(length)
        filled += length
    parts.append(window[text_used : text_used + size - filled])
    return np.concatenate(parts)
