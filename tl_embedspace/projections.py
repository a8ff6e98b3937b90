"""Vectors to token scores, token filters and token display: the pure helpers under ``space.py``.

A vector that a component *writes* into the residual stream (a feed-forward value, a row of W_O, an
embedding, a steering vector) is read as ``v @ W`` with a write basis ``W [d_model, d_vocab]``.
A vector that a component *reads* from the residual stream by a dot product (a feed-forward key or
gate key, a column of W_Q/W_K/W_V, an unembedding) is read as ``R @ k`` with a read basis
``R [d_vocab, d_model]``: the score of token t is how strongly t's residual vector drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from jaxtyping import Float, Int

from tl_embedspace.filters import EmptyFilterError, corpus_filter  # noqa: F401 - EmptyFilterError re-exported
from tl_plugins.checks import is_int

_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def visible(s: str) -> str:
    """Show spaces, newlines and tabs in a token string (" the" -> "\u2423the")."""
    return "".join(_VISIBLE.get(c, c) for c in s)


def from_visible(s: str) -> str:
    """Undo :func:`visible`, so a user may type tokens as they are displayed."""
    inverse = {v: k for k, v in _VISIBLE.items()}
    return "".join(inverse.get(c, c) for c in s)


def write_scores(vectors: Float[torch.Tensor, "... d_model"], W: Float[torch.Tensor, "d_model d_vocab"]
                 ) -> Float[torch.Tensor, "... d_vocab"]:
    """Token scores of written vectors: ``vectors [..., d_model] @ W [d_model, d_vocab] -> [..., d_vocab]``."""
    if vectors.shape[-1] != W.shape[0]:
        raise ValueError(f"vector: last dimension {vectors.shape[-1]} does not match d_model {W.shape[0]}")
    return vectors.to(W.dtype) @ W


def read_scores(vectors: Float[torch.Tensor, "... d_model"], R: Float[torch.Tensor, "d_vocab d_model"]
                ) -> Float[torch.Tensor, "... d_vocab"]:
    """Token scores of read vectors: ``vectors [..., d_model]``, ``R [d_vocab, d_model] -> [..., d_vocab]``."""
    if vectors.shape[-1] != R.shape[1]:
        raise ValueError(f"vector: last dimension {vectors.shape[-1]} does not match d_model {R.shape[1]}")
    return vectors.to(R.dtype) @ R.T


def top_bottom(scores: Float[torch.Tensor, " d_vocab"], k: int, ids: Int[torch.Tensor, " n"] | None = None
               ) -> tuple[Float[torch.Tensor, " k"], Int[torch.Tensor, " k"], Float[torch.Tensor, " k"],
                          Int[torch.Tensor, " k"]]:
    """Top-k and bottom-k of ``scores [d_vocab]`` among ``ids`` (all when None).

    Returns ``(top_values, top_ids, bottom_values, bottom_ids)``, each ``[min(k, n)]``; ties go to the
    smaller id.
    """
    if not is_int(k) or k <= 0:
        raise ValueError(f"k: got {k!r}; accepted: a positive int")
    if ids is None:
        ids = torch.arange(scores.shape[-1])
    sub = scores[ids.to(scores.device)].double().cpu()
    kk = min(k, sub.numel())
    # stable sorts give deterministic ties (smaller id first, ids are sorted)
    order = torch.argsort(-sub, stable=True)[:kk]
    order_b = torch.argsort(sub, stable=True)[:kk]
    return (scores[ids[order]].cpu(), ids[order], scores[ids[order_b]].cpu(), ids[order_b])


FilterLike = Union[None, str, Sequence[int], torch.Tensor, Callable[[str], bool], list]

NAMED_FILTERS = {
    "ascii": lambda s: s.isascii() and len(s) > 0,
    "alnum": lambda s: s.strip().isalnum(),
    "alpha": lambda s: s.strip().isalpha(),
    "words": lambda s: s.startswith(" ") and s[1:].isalpha(),
    # whole words of the standard library's documentation (tl_embedspace.filters); built on first use
    "corpus": lambda s: _corpus_predicate()(s),
}


def _corpus_predicate():
    return corpus_filter()


def build_filter(spec: FilterLike, d_vocab: int, token_strings: Callable[[], list[str]] | None
                 ) -> torch.Tensor | None:
    """Turn a filter spec into sorted token ids, or None for no filter.

    ``spec``: None; a name ("ascii", "alnum", "alpha", "words": a leading space then letters, "corpus":
    whole words of ``pydoc_data.topics``, see ``tl_embedspace.filters``); ids;
    a bool mask ``[d_vocab]``; a predicate on the decoded token string; or a list of these
    (intersected). String filters need token strings (a tokenizer).
    """
    if spec is None:
        return None
    if isinstance(spec, list) and spec and not all(is_int(x) for x in spec):
        out: torch.Tensor | None = None
        for part in spec:
            ids = build_filter(part, d_vocab, token_strings)
            if ids is None:
                continue
            out = ids if out is None else out[torch.isin(out, ids)]
        if out is not None and out.numel() == 0:
            raise ValueError(f"filters: {spec!r} together keep no token")
        return out
    if isinstance(spec, str) or callable(spec):
        if isinstance(spec, str):
            if spec not in NAMED_FILTERS:
                raise ValueError(f"filters: unknown filter {spec!r}; accepted: {', '.join(NAMED_FILTERS)}, "
                                 "ids, a bool mask, a predicate on token strings, or a list of these")
            pred = _corpus_predicate() if spec == "corpus" else NAMED_FILTERS[spec]
        else:
            pred = spec
        if token_strings is None:
            raise ValueError(f"filters: {spec!r} needs token strings, and the model has no tokenizer; "
                             "pass token ids or a bool mask instead")
        strings = token_strings()
        ids = torch.tensor([i for i, s in enumerate(strings) if pred(s)], dtype=torch.long)
    else:
        t = torch.as_tensor(spec)
        if t.dtype == torch.bool:
            if t.shape != (d_vocab,):
                raise ValueError(f"filters: a bool mask must have shape ({d_vocab},); got {tuple(t.shape)}")
            ids = t.nonzero().flatten()
        else:
            ids = torch.unique(t.flatten().long())
            if ids.numel() and (ids.min() < 0 or ids.max() >= d_vocab):
                raise IndexError(f"filters: token ids must be in [0, {d_vocab - 1}]; got {spec!r}")
    if ids.numel() == 0:
        raise EmptyFilterError(f"filters: {spec!r} keeps no token of this vocabulary ({d_vocab} tokens); "
                               "accepted: a filter that keeps at least one token, or None")
    return ids


def copying_score_from_eigenvalues(eig: torch.Tensor) -> float:
    """Sum of real parts over sum of magnitudes of the eigenvalues (1 = pure copying, -1 = anti)."""
    mag = eig.abs().sum()
    if float(mag) == 0.0:
        return 0.0  # an all-zero circuit copies nothing
    return float(eig.real.sum() / mag)
