"""Token filters built from real text: keep the tokens that occur as whole words in a reference corpus.

Dar et al. (2023) kept the tokens seen in their IMDB corpus so that vocabulary-space tables read as
words rather than byte pieces, code fragments and rare scripts. Here the corpus is the Python
documentation in the standard library (``pydoc_data.topics``, on every machine): about 2 MB of
English prose and code. A token passes the ``"corpus"`` filter when its decoded string, with one
leading space (or SentencePiece's "\u2581") removed, is a word of at least two letters (or "a" / "I")
that occurs delimited as a whole word in that text at least twice, case as it occurs there; words
in capitals only (acronyms, constants) are left out.

``corpus_filter()`` returns the predicate; ``corpus_words()`` the word set (cached). The unfiltered view
is ``filters=None`` on ``EmbeddingSpace`` (``--filter none`` on the command line). Results record the
filter in their ``basis`` (``filter=corpus:pydoc_data (N tokens)``).
"""

from __future__ import annotations

import functools
import re
from typing import Callable

from tl_plugins.corpus import SOURCE, docs_text

CORPUS_NAME = "corpus"
CORPUS_SOURCE = SOURCE
_WORD = re.compile(r"(?<![\w.'])[A-Za-z]+(?:'[a-z]+)?(?![\w'])")


@functools.lru_cache(maxsize=1)
def corpus_words() -> frozenset[str]:
    """Whole words (letters only, optional apostrophe suffix) in the standard library's documentation."""
    from collections import Counter

    counts: Counter[str] = Counter(m.group(0) for m in _WORD.finditer(docs_text(None)))
    # seen at least twice; acronyms and constants (all capitals: "RB", "NULL") are not words
    return frozenset(w for w, c in counts.items()
                     if c >= 2 and (len(w) >= 2 or w in ("a", "I")) and not (len(w) > 1 and w.isupper()))


def token_word(s: str) -> str:
    """The word a token string stands for: one leading space or "\u2581" removed."""
    if s[:1] in (" ", "\u2581"):
        return s[1:]
    return s


def corpus_filter() -> Callable[[str], bool]:
    """Predicate on decoded token strings: True for whole words of the reference corpus."""
    words = corpus_words()
    return lambda s: token_word(s) in words


def describe(spec, n_kept: int | None) -> str:
    """How a filter spec is written into results' ``basis``."""
    if spec is None:
        return "none"
    if isinstance(spec, str):
        name = f"{spec}:{CORPUS_SOURCE}" if spec == CORPUS_NAME else spec
    elif callable(spec):
        name = f"predicate {getattr(spec, '__name__', '?')}"
    elif isinstance(spec, list):
        name = "+".join(describe(s, None).split(" (")[0] for s in spec)
    else:
        name = "ids"
    return f"{name} ({n_kept:,} tokens)" if n_kept is not None else name


class EmptyFilterError(ValueError):
    """A token filter that keeps no token of the vocabulary it was applied to."""


__all__ = ["CORPUS_NAME", "CORPUS_SOURCE", "EmptyFilterError", "corpus_filter", "corpus_words", "describe",
           "token_word"]
