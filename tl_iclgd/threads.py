"""``torch_threads(n)``: run a block with ``n`` torch threads and restore the previous count after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set ``torch.set_num_threads(n)`` for the block; the previous count is restored even on error.

    n: an int >= 1 (callers validate it, naming their own argument).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["torch_threads"]
