"""The ``corpus`` token filter (whole words of ``pydoc_data.topics``) against a brute-force count, its
record in results, and the CLI's ``--filter auto`` fallback on a vocabulary the corpus does not reach."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from tl_embedspace.filters import corpus_filter, corpus_words, describe, token_word
from tl_embedspace.projections import EmptyFilterError, build_filter


def _brute_force_count(word: str) -> int:
    """Occurrences of ``word`` delimited by non-word characters (no '.' or "'" before, no "'" after)."""
    from pydoc_data.topics import topics

    n = 0
    for text in topics.values():
        start = 0
        while (i := text.find(word, start)) >= 0:
            before = text[i - 1] if i else " "
            after = text[i + len(word)] if i + len(word) < len(text) else " "
            if not (before.isalnum() or before in "_.'") and not (after.isalnum() or after in "_'"):
                n += 1
            start = i + 1
    return n


@pytest.mark.parametrize("word", ["function", "object", "return", "the", "exception", "iterator"])
def test_common_words_are_in_with_their_brute_force_count(word):
    assert _brute_force_count(word) >= 2
    assert word in corpus_words()


@pytest.mark.parametrize("piece", ["strugg", "enthus", "dissemin", "ighthouse", "authent"])
def test_sub_word_fragments_are_out(piece):
    assert _brute_force_count(piece) < 2
    assert piece not in corpus_words()


def test_words_agree_with_brute_force_on_a_sample():
    words = sorted(corpus_words())
    assert 1000 < len(words) < 10000
    for w in words[:: max(1, len(words) // 40)]:
        assert _brute_force_count(w) >= 2, w
        assert not (len(w) > 1 and w.isupper()), w  # acronyms and constants are left out
        assert re.fullmatch(r"[A-Za-z]+(?:'[a-z]+)?", w), w


def test_predicate_strips_one_leading_space_or_sentencepiece_mark():
    keep = corpus_filter()
    assert token_word(" function") == "function" and token_word("\u2581function") == "function"
    assert keep(" function") and keep("\u2581function") and keep("function")
    assert not keep("  function")  # two spaces: not a whole-word token
    assert not keep(" strugg") and not keep("NULL") and not keep("")


def test_build_filter_keeps_exactly_the_corpus_tokens():
    strings = [" function", "function", " strugg", "<bos>", "\u2581return", " NULL", " object"]
    ids = build_filter("corpus", len(strings), lambda: strings)
    assert ids.tolist() == [0, 1, 4, 6]


def test_a_filter_that_keeps_nothing_is_a_clear_error():
    strings = ["w4", "w5", "w6"]
    with pytest.raises(EmptyFilterError, match=r"filters: 'corpus' keeps no token of this vocabulary \(3 tokens\)"):
        build_filter("corpus", 3, lambda: strings)
    assert issubclass(EmptyFilterError, ValueError)


def test_describe_records_the_source_and_the_count():
    assert describe(None, None) == "none"
    assert describe("corpus", 4445) == "corpus:pydoc_data.topics (4,445 tokens)"
    assert describe("alpha", 12) == "alpha (12 tokens)"


def test_auto_falls_back_to_no_filter_on_a_word_tokenizer_and_explicit_corpus_raises():
    from tl_embedspace.space import resolve_filter, space_with_filter
    from tl_plugins.models import tiny

    model = tiny.tiny_bridge("llama")  # word tokenizer: "w4", "w5", ... none of them corpus words
    assert resolve_filter("auto", model) == "corpus" and resolve_filter("none", model) is None
    sp = space_with_filter(model, "corpus", auto=True)
    assert sp.filter_ids is None and sp.basis["filter"] == "none"
    with pytest.raises(EmptyFilterError, match="keeps no token"):
        space_with_filter(model, "corpus", auto=False)


def test_cli_explicit_corpus_on_a_model_without_words_is_a_usage_error():
    from tl_plugins.cli import build_cli

    cli = build_cli()
    base = ["embedspace", "top-tokens", "--model", "tiny-llama", "--layer", "0", "--neuron", "0"]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, base + ["--filter", "corpus"])
    assert r.exit_code == 2, r.output
    assert "filters" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_smollm2_corpus_filter_keeps_words_and_is_recorded(smollm2):
    from tl_embedspace.space import EmbeddingSpace

    sp = EmbeddingSpace(smollm2, filters="corpus")
    assert sp.basis["filter"].startswith("corpus:pydoc_data.topics (")
    kept = sp.filter_ids
    strings = smollm2.tokenizer.convert_ids_to_tokens(kept.tolist())
    words = [smollm2.tokenizer.decode([i]) for i in kept[:200].tolist()]
    assert all(token_word(w) in corpus_words() for w in words)
    assert 2000 < kept.numel() < 10000 and len(strings) == kept.numel()
    # the brute-force oracle over the whole vocabulary: decode every id and apply the word set
    everything = [smollm2.tokenizer.decode([i]) for i in range(smollm2.cfg.d_vocab)]
    oracle = torch.tensor([i for i, s in enumerate(everything) if token_word(s) in corpus_words()])
    assert torch.equal(kept, oracle)
