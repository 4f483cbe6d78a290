"""Tokenizers that never touch the network.

Two kinds are used in cdist:

- a word-level tokenizer for the model organisms (the zoo): one token per word or punctuation mark,
  so that an entity-tracking prompt is ~50 tokens and every object, label and state is a single
  token;
- the real Llama-3 tokenizer, built offline from the tiktoken file that the PyPI package
  ``llama-models`` ships (see ``llama3_tokenizer``).

TransformerLens tries the model hub whenever it is handed a tokenizer it has to re-create, so every
tokenizer made here is saved with ``save_pretrained`` and reloaded from that directory before it is
returned.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cdist.checkpoints import atomic_directory, atomic_write_bytes, check_replaceable
from cdist.errors import InputError, RunFolderError

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")


def word_tokenizer(
    words: Iterable[str], save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is the special tokens followed by ``words``.

    Text is split on whitespace and punctuation, so "Box F, the" is ["Box", "F", ",", "the"]. Every
    encoded text starts with ``<bos>`` (as Llama-3's tokenizer starts with ``<|begin_of_text|>``).

    Args:
        words: the vocabulary, in id order after the four special tokens; duplicates are dropped,
            first wins.
        save_dir: where to save it (a new folder, or beside what a folder holds, such as a
            checkpoint's weights: a file of the tokenizer's names already there is replaced only
            when it holds the same bytes, so no user's file is rewritten); a temporary directory
            when None.

    Returns:
        The tokenizer, reloaded from ``save_dir``.

    Raises:
        RunFolderError: ``save_dir`` holds a different file of one of the tokenizer's names.
    """
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        if not word or any(c.isspace() for c in word):
            raise InputError(f"word-level vocabulary entry {word!r} is empty or has whitespace; "
                             "give single words")
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if save_dir is None:
        save_dir = Path(tempfile.mkdtemp(prefix="cdist-tok-"))
        fast.save_pretrained(save_dir)
    else:
        save_dir = _save_beside(fast, Path(save_dir))
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def _save_beside(tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    """Save ``tokenizer``'s files into ``folder`` beside what it holds, each atomically, after
    checking that none would replace a different file (``word_tokenizer``)."""
    with tempfile.TemporaryDirectory(prefix="cdist-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        made = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder; give a folder")
    clash = sorted(name for name, data in made.items()
                   if (folder / name).exists() and (folder / name).read_bytes() != data)
    if clash:
        raise RunFolderError(f"{folder} already holds {', '.join(clash)}, which the tokenizer "
                             "would replace; give another folder (cdist rewrites no file it "
                             "did not write)")
    for name, data in made.items():
        atomic_write_bytes(data, folder / name)
    return folder


LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"


def llama3_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The real Llama-3 tokenizer (128,256 ids), built offline from the tiktoken file in
    ``llama-models``.

    It gives the ids of
    ``llama_models.llama3.tokenizer.Tokenizer().encode(text, bos=True, eos=False)`` and of
    meta-llama/Llama-3.2-1B's own tokenizer: the same byte-level BPE, split pattern and special
    tokens (``<|begin_of_text|>`` = 128000, ``<|end_of_text|>`` = 128001, ... ``<|eot_id|>`` =
    128009, then the reserved ones), and a post-processor that puts ``<|begin_of_text|>`` first. Our
    choices: the eos token is ``<|end_of_text|>`` (the base models'; the -Instruct ones end turns
    with ``<|eot_id|>``), there is no chat template, and ``clean_up_tokenization_spaces`` is off so
    that ``decode`` gives back the text exactly.

    The conversion is slow next to a load, so the result is saved once under ``cache_dir`` and
    reloaded from there (which TransformerLens also needs: it re-creates tokenizers from their saved
    directory).

    Args:
        cache_dir: where the converted tokenizer lives; default
            ``$CDIST_CACHE/llama3-tokenizer``, or ``~/.cache/cdist/llama3-tokenizer`` when
            ``CDIST_CACHE`` is unset.

    Returns:
        The tokenizer, loaded from ``cache_dir``.

    Warning:
        Special-token text inside a string (say "<|eot_id|>") becomes the special token here,
        whereas ``llama_models``' ``encode`` (with its default ``allowed_special``) reads it as
        plain text.
    """
    if cache_dir is None:
        root = os.environ.get("CDIST_CACHE")
        cache_dir = Path(root) if root else Path.home() / ".cache" / "cdist"
        cache_dir = cache_dir / "llama3-tokenizer"
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer.json").is_file():
        _build_llama3_tokenizer(cache_dir)
    return PreTrainedTokenizerFast.from_pretrained(cache_dir)


def _build_llama3_tokenizer(out_dir: Path) -> None:
    check_replaceable(out_dir, _earlier_cache)  # before the slow conversion, not after
    # Imported here: llama_models and the converter are only needed for the one-off build.
    from llama_models.llama3 import tokenizer as meta
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(meta.__file__).parent / "tokenizer.model"
    reference = meta.Tokenizer(model_file)
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    # The converter appends the special tokens after the 128,000 BPE ranks, in the order given,
    # which is how Meta numbers them; checked below rather than trusted.
    tok = TikTokenConverter(
        vocab_file=str(model_file), pattern=reference.pat_str, extra_special_tokens=specials
    ).converted()
    if tok.token_to_id(LLAMA3_BOS) != reference.bos_id or tok.get_vocab_size() != reference.n_words:
        raise RuntimeError(f"converted Llama-3 tokenizer disagrees with {model_file} "
                           "on special-token ids")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{LLAMA3_BOS} $A",
                pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B:1",
                special_tokens=[(LLAMA3_BOS, reference.bos_id)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=LLAMA3_BOS,
        eos_token=LLAMA3_EOS,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
    )
    # Written beside the cache and renamed into place, so a concurrent or interrupted build never
    # leaves a half-written cache that later calls would trust; a folder of the user's given as
    # the cache is refused, not replaced (an incomplete cache of an earlier cdist, which wrote
    # only tokenizer files there, is replaced).
    atomic_directory(out_dir, fast.save_pretrained, earlier=_earlier_cache)


def _earlier_cache(folder: Path) -> bool:
    """Whether ``folder`` holds only tokenizer files (an earlier cdist's cache, before checkpoints
    recorded their files)."""
    return all(p.name.startswith(("tokenizer", "special_tokens_map")) for p in folder.iterdir())


# Encoded by both tokenizers of a teacher-student pair: a prompt of each task's shape, with the
# special tokens each adds around it.
_PROBE = "The apple is in Box F, the pen is in Box Q. Box F contains the"


def tokenizer_difference(a, b) -> str | None:
    """How two tokenizers differ, in a few words, or None when they encode the same way: the same
    vocabulary (every token to the same id), the same special-token ids, and the same ids for a
    probe prompt (BOS added or not, the same merges)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))
        moved = sum(va[t] != vb[t] for t in set(va) & set(vb))
        return (f"vocabularies of {len(va)} and {len(vb)} tokens ({len(only)} in one only, e.g. "
                f"{only[:3]}; {moved} with other ids)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} {getattr(a, name, None)} against {getattr(b, name, None)}"
    ia, ib = a(_PROBE)["input_ids"], b(_PROBE)["input_ids"]
    if ia != ib:
        return f"the same prompt encodes as {ia[:6]}... and {ib[:6]}..."
    return None
