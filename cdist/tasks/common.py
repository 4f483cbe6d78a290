"""What the task generators share: rendering with marked words, tokenizing,
and train/test splitting.

A task item is rendered into a prompt from format strings; every ``{field}`` filled in is a *marked
word* whose character offset is remembered. After tokenizing, each marked word is located by the
token offsets (``return_offsets_mapping``), which works alike for the word-level organism tokenizer
("apple") and for Llama-3's byte-level BPE (" apple"), and the token found there must spell exactly
that word.

Choices that are ours:
- An item's identity is a key (a tuple of its content, never of its rendering); the key's SHA-256
  picks one of 10,000 buckets and the first ``TEST_FRACTION`` of buckets are the test split. Train
  and test can therefore never share an item, whatever ``n``, seed or template, and the split of an
  item never changes.
- Each split is drawn by rejection from one ``random.Random`` seeded by (task, seed, split): items
  are i.i.d. within a split (duplicates are possible when the item space is small), and the first k
  items do not depend on ``n``.
- Tokenizers must be "fast" (Rust-backed), because only they report character offsets.
- A word list the caller leaves out is the task's default list less the words this tokenizer does
  not keep as one token (``default_or_given``), in the default order, so a tokenizer that keeps
  every default word (the organism's, Llama-3's) draws the same items as the full lists. A list the
  caller passes is used as given: dropping a word from it would silently change what was asked
  for, so a word that is not one token is an error instead.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cdist.errors import InputError

T = TypeVar("T")

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
_BUCKETS = 10_000
LARGE = 20_000  # items: a set this large is made with a progress bar


def item_split(key: tuple) -> str:
    """The split ("train" or "test") an item belongs to, from a stable hash of its key."""
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    return "test" if bucket < TEST_FRACTION * _BUCKETS else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {SPLITS}; "
                         "pass split='train' or split='test'")


def task_rng(task: str, seed: int, split: str) -> random.Random:
    """The one random stream of a (task, seed, split); string seeds are hashed
    stably by ``random``.
    """
    return random.Random(f"{task}|{seed}|{split}")


_NO = object()


def check_request(n: int, split: str, *, tokenizer=_NO, seed=_NO) -> None:
    """Refuse a generator's arguments that would fail deep inside it, or pass unnoticed (a seed
    of None, read as the string "None"): ``InputError`` naming the argument."""
    from transformers import PreTrainedTokenizerBase

    check_split(split)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n={n!r}: ask for a whole number of items, at least 1")
    if tokenizer is not _NO and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InputError(f"tokenizer={type(tokenizer).__name__}; pass a Hugging Face tokenizer, "
                         "e.g. model.tokenizer")
    if seed is not _NO and (isinstance(seed, bool) or not isinstance(seed, (int, str))):
        raise InputError(f"seed={seed!r}; give a whole number (or a string)")


def draw_split(n: int, split: str, propose: Callable[[], T],
               key: Callable[[T], tuple]) -> Iterator[T]:
    """Yield ``n`` proposals whose key falls in ``split``, rejecting the others.

    A generator, so a caller that draws more from the same rng between items (a counterfactual, say)
    keeps the first k items independent of ``n``.
    """
    from cdist.progress import bar

    check_request(n, split)
    # About 1 in 5 proposals lands in test; 100x that without success means the item
    # space is degenerate.
    budget = 100 * n + 1000
    made = 0
    # a set that takes more than a few seconds to make says so (cdist.limits refuses sets that
    # could not fit in memory before any is made)
    with bar(n, f"{split} items", enabled=n >= LARGE, unit="item") as progress:
        while made < n:
            if budget == 0:
                raise InputError(
                    f"could not draw {n} {split} items: too few distinct items fall in this "
                    "split; use longer word lists"
                )
            budget -= 1
            item = propose()
            if item_split(key(item)) == split:
                made += 1
                progress.update()
                yield item


def _is_one_token(tokenizer, ids: Sequence[int]) -> bool:
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def single_token_id(tokenizer, word: str, role: str = "answer") -> int:
    """The id of ``word`` as it appears after a space in a prompt (Llama-3: " apple";
    word-level: "apple").

    Raises:
        ValueError: if the word splits into several tokens or is unknown (<unk>) to the vocabulary.
    """
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if not _is_one_token(tokenizer, ids):
        what = f"it is {pieces[0]}" if len(ids) == 1 else f"it splits into {pieces}"
        raise InputError(
            f"{role} {word!r} is not a single token in this tokenizer's vocabulary ({what}); "
            "choose words that are single tokens or use the word-level organism tokenizer"
        )
    return ids[0]


@dataclass(frozen=True)
class WordChoice:
    """The words of a list that a tokenizer keeps as one token each, and the others; both keep the
    list's order."""

    kept: tuple[str, ...]
    dropped: tuple[str, ...]


def single_token_words(tokenizer, words: Sequence[str]) -> WordChoice:
    """Split ``words`` by ``single_token_id``'s test: " " + word is one known token."""
    ids = tokenizer([" " + w for w in words], add_special_tokens=False).input_ids if words else []
    one = [_is_one_token(tokenizer, word_ids) for word_ids in ids]
    return WordChoice(kept=tuple(w for w, ok in zip(words, one, strict=True) if ok),
                      dropped=tuple(w for w, ok in zip(words, one, strict=True) if not ok))


def default_or_given(tokenizer, given: Sequence[str] | None, default: Sequence[str], role: str,
                     at_least: int) -> list[str]:
    """The ``role`` words (a generator's ``{role}s`` argument) that items are drawn from.

    Args:
        given: the caller's list, or None. A list is taken whole (``check_words``), once every
            word of it is one token (``single_token_id`` refuses the first that is not, by name).
        default: the task's default list; without ``given``, the words of it that this tokenizer
            keeps as one token, in its order.
        role: the singular of the argument's name, for messages ("object").
        at_least: words one item needs.

    Raises:
        ValueError: if fewer than ``at_least`` words remain (one line: what to pass instead).
    """
    if given is not None:
        for word in given:  # a word that is not a token is the problem to name, before counting
            single_token_id(tokenizer, word, role)
        return check_words(given, role, at_least)
    kept = list(single_token_words(tokenizer, default).kept)
    if len(kept) < at_least:
        raise InputError(
            f"{len(kept)} of the {len(default)} default {role}s are single tokens for this "
            f"tokenizer, but an item needs {at_least}; pass {role}s=[...] with at least "
            f"{at_least} single-token words"
        )
    return kept


def check_words(words: Sequence[str], role: str, at_least: int) -> list[str]:
    """A word list as a list, refusing duplicates and lists too short for one item."""
    words = list(words)
    if len(set(words)) != len(words):
        dup = sorted({w for w in words if words.count(w) > 1})
        raise InputError(f"{role} list repeats {dup}; give distinct words")
    if len(words) < at_least:
        raise InputError(f"{role} list has {len(words)} words but an item needs {at_least}; "
                         "give more words")
    return words


@dataclass
class Prompt:
    """Text built piece by piece, remembering where each filled-in (marked) word starts."""

    text: str = ""
    marks: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (char offset, word)

    def add(self, fmt: str, tag: str = "", **values: str) -> None:
        """Append ``fmt`` filled with ``values``; field ``f`` is marked as ``f + tag``
        (a later one wins).
        """
        for literal, name, _, _ in string.Formatter().parse(fmt):
            self.text += literal
            if name is not None:
                self.marks[name + tag] = (len(self.text), values[name])
                self.text += values[name]


def encode(tokenizer, prompts: Sequence[Prompt]) -> list[tuple[list[int], dict[str, int]]]:
    """Tokenize prompts (with the special tokens the tokenizer adds: Llama-3's BOS, none for
    SmolLM2) and find each marked word's token index.

    Returns:
        Per prompt, its input ids and ``{mark name: token index}``.

    Raises:
        ValueError: if a marked word is not exactly one (known) token at its place in the prompt.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("task prompts need a fast tokenizer (for token offsets); "
                         "load it with use_fast=True")
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True)
    out = []
    for ids, offsets, prompt in zip(enc["input_ids"], enc["offset_mapping"], prompts, strict=True):
        ends = [end for _, end in offsets]
        positions = {}
        for name, (start, word) in prompt.marks.items():
            # The first token ending after the word's first character holds it (a BPE token may
            # carry the space before it); it must cover the word and nothing else. A BOS ends at
            # 0, before any word, so its presence or absence does not change the search.
            i = bisect.bisect_right(ends, start)
            s, e = offsets[i] if i < len(ids) else (start, start)
            spelled = prompt.text[s:e].strip()
            if i == len(ids) or ids[i] == tokenizer.unk_token_id or spelled != word:
                raise InputError(
                    f"{word!r} is not a single token at its place in the prompt "
                    f"{prompt.text[:60]!r}...; "
                    "choose words that are single tokens or use the word-level organism tokenizer"
                )
            positions[name] = i
        out.append((list(ids), positions))
    return out
