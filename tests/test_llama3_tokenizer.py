"""cdist.tokenizers.llama3_tokenizer: the offline Llama-3 tokenizer gives Meta's own ids."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from llama_models.llama3 import tokenizer as meta

from cdist import tokenizers
from cdist.models import new_llama
from cdist.tokenizers import llama3_tokenizer

TEXTS = [
    "The apple is in Box F, the pen is in Box Q. Box F contains the",
    "Hello, world! It's 2025; they'll've said 1234567 or 3.14159 — maybe.",
    "naïve café Zürich 東京 Москва 🎉🚀 ﬁ",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\tprint(f(3))",
    "   leading spaces, trailing   \n\n\n  and   runs\t\tof\r\nwhitespace   ",
    "",
    " ",
    "What does Alice believe the bottle contains? unknown",
    "URLs: https://example.com/a?b=c&d=e, emails: x.y@z.org, ids: A1B2C3",
    "Ünïcödé ÀÉÎÕÜ ß ĳ ǅ",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(tokenizer, cache dir, seconds the first, uncached call took)."""
    cache = tmp_path_factory.mktemp("cdist-cache") / "llama3-tokenizer"
    start = time.perf_counter()
    tok = llama3_tokenizer(cache)
    return tok, cache, time.perf_counter() - start


@pytest.fixture(scope="module")
def reference():
    return meta.Tokenizer(Path(meta.__file__).parent / "tokenizer.model")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_llama_models(text, built, reference):
    tok, _, _ = built
    assert tok.encode(text) == reference.encode(text, bos=True, eos=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(text, built):
    tok, _, _ = built
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_special_tokens(built, reference):
    tok, _, _ = built
    assert len(tok) == reference.n_words == 128256
    for name, idx in reference.special_tokens.items():
        assert tok.convert_tokens_to_ids(name) == idx
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128001)
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009


def test_cached_call_reloads_without_building_and_is_equal(built, record_property, monkeypatch):
    tok, cache, first = built

    def build_again(out_dir):
        raise AssertionError(f"the tokenizer was rebuilt although {out_dir} holds it")

    monkeypatch.setattr(tokenizers, "_build_llama3_tokenizer", build_again)
    start = time.perf_counter()
    again = llama3_tokenizer(cache)
    second = time.perf_counter() - start
    record_property("build_s", first)
    record_property("cached_s", second)
    print(f"llama3_tokenizer: build {first:.2f} s, cached {second:.2f} s")  # information only
    assert again.get_vocab() == tok.get_vocab()
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    # no temporary folders left
    assert not any(p.name.startswith(".") for p in cache.parent.iterdir())


def test_default_cache_dir_follows_cdist_cache(built, tmp_path, monkeypatch):
    tok, cache, _ = built
    monkeypatch.setenv("CDIST_CACHE", str(cache.parent))
    assert llama3_tokenizer().name_or_path == str(cache)


def test_transformer_lens_prepends_one_bos(built):
    tok, _, _ = built
    model = new_llama(
        n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, d_mlp=16, vocab_size=len(tok), tokenizer=tok
    )
    assert model.to_tokens("Hello world").tolist() == [[128000, 9906, 1917]]
