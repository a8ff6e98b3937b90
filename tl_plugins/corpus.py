"""Real text no one here wrote, on every machine: the Python documentation that the standard library
ships (``pydoc_data.topics``), as text and as token ids of a model.

The one place the plugins take it from (perplexity runs, the report's evaluations, the debugger's
checks), with the one rule for a model without a tokenizer (tiny random test models): the UTF-8
bytes of the text, each modulo the vocabulary size, so that such a model still reads a fixed,
text-shaped sequence.

    text = docs_text(20_000)              # whole entries in sorted key order, at least 20,000 characters
    tokens = docs_tokens(model, 256)      # [1, 256] on the model's device
"""

from __future__ import annotations

from typing import Any, Optional

import torch

SOURCE = "pydoc_data.topics"


def docs_text(n_chars: Optional[int] = 200_000, sep: str = "\n") -> str:
    """``pydoc_data.topics`` entries in sorted key order (deterministic), joined by ``sep``: whole
    entries until at least ``n_chars`` characters are in (None: every entry)."""
    from pydoc_data.topics import topics

    parts, total = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        total += len(topics[key])
        if n_chars is not None and total >= n_chars:
            break
    return sep.join(parts)


def text_ids(text: str, tokenizer: Any, d_vocab: int) -> list[int]:
    """Token ids of ``text`` without special tokens; with no tokenizer, its UTF-8 bytes modulo ``d_vocab``."""
    if tokenizer is not None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [b % d_vocab for b in text.encode("utf-8")]


def docs_tokens(model: Any, n_tokens: int) -> torch.Tensor:
    """[1, n_tokens] token ids of the docs text (no BOS) on the model's device; a model without a
    tokenizer gets the text's bytes modulo d_vocab (see the module doc)."""
    from tl_plugins.backends import detect

    backend = detect(model)
    ids = text_ids(docs_text(max(20_000, n_tokens * 8)), backend.tokenizer, backend.d_vocab)
    if len(ids) < n_tokens:
        raise ValueError(f"n_tokens: got {n_tokens}; the docs text gives only {len(ids)} tokens")
    return torch.tensor(ids[:n_tokens], device=backend.device).unsqueeze(0)


__all__ = ["SOURCE", "docs_text", "docs_tokens", "text_ids"]
