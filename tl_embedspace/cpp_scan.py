"""The compiled scan behind ``topk_product(backend="cpp")`` (``tl_embedspace/cpp/bounded_scan.cpp``).

The kernel takes a product ``A @ B`` already prepared by ``tl_embedspace.factored_topk``: every row and
column's first ``h`` coordinates in the balanced SVD basis of the product (``ah``, ``bh``), the
Cauchy-Schwarz terms for the remaining coordinates (``rt``, ``st``, ``q``, every rounding allowance
folded in) and the coarser centred bound that skips whole columns (``rho``, ``slope``, ``intercept``).
It visits rows in blocks by decreasing radius, bounds each listed entry in registers from its ``h``
coordinates, and computes from the caller's own factors (a dot product accumulated in double) only
the entries whose bound reaches the running k-th key; per-thread heaps keep the best k. Built on first
use like every compiled extension of the project (``tl_plugins.extensions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_plugins.extensions import CompiledExtension

EXTENSION = CompiledExtension("tl_embedspace_scan", Path(__file__).with_name("cpp") / "bounded_scan.cpp")
MODE_CODES = {"largest": 0, "smallest": 1, "abs": 2}


def supports(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernel takes these factors: CPU tensors of one dtype, float32 or float64."""
    return (A.device.type == "cpu" and B.device.type == "cpu" and A.dtype == B.dtype
            and A.dtype in (torch.float32, torch.float64))


def available() -> bool:
    """Whether the extension is built or builds now (the first call takes about half a minute)."""
    return EXTENSION.available()


def available_for_auto() -> bool:
    """``available()``, warning once per process when it is not (``auto`` then scans in torch)."""
    return EXTENSION.available_or_warn("tl_embedspace", "topk_product(backend='auto') scans in torch instead "
                                       "(slower, same results)")


def availability() -> str:
    """One line: can the compiled scan run here, and why not."""
    return EXTENSION.availability("compiled CPU scan; auto for CPU float32/float64 factors")


def load() -> Any:
    """The compiled module; ``RuntimeError`` naming why it cannot be built."""
    return EXTENSION.load_for("backend='cpp'", "use backend='torch'")


def bounded_scan(
    ah: Float[torch.Tensor, "rows_pad H"],
    rt: Float[torch.Tensor, "2 rows_pad"],
    rho: Float[torch.Tensor, " rows"],
    row_ids: Int[torch.Tensor, " rows"],
    A: Float[torch.Tensor, "n r"],
    bh: Float[torch.Tensor, "cols H"],
    st: Float[torch.Tensor, "2 cols"],
    q: Float[torch.Tensor, "2 cols"],
    slope: Float[torch.Tensor, " cols"],
    intercept: Float[torch.Tensor, " cols"],
    col_ids: Int[torch.Tensor, " cols"],
    B: Float[torch.Tensor, "r m"],
    h1: int,
    k: int,
    mode: str,
    exclude_diagonal: bool,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Run the kernel on prepared inputs (see the module docstring and the C++ header for each one's
    meaning; rows in scan order, ``ah``/``rt`` zero-padded to a multiple of ``MR`` rows).

    ``threshold``: a certified lower bound on the k-th key (-inf when none). Returns ``(keys [c],
    values [c], rows [c], cols [c], stats)``: at most k candidates per thread (float64 keys and signed
    values, int64 ids), not yet merged; stats ``bounded`` (entries bounded from their first ``h1``
    coordinates), ``refined`` (of those, bounded again from all ``H``), ``exact`` (entries computed from
    the factors) and ``rows_end`` (scan-order rows the blocks reached).
    """
    ext = load()
    keys, values, rows, cols, stats = ext.scan(ah, rt, rho, row_ids, A, bh, st, q, slope, intercept, col_ids, B,
                                               int(h1), int(k), MODE_CODES[mode], bool(exclude_diagonal), float(threshold))
    bounded, refined, exact, rows_end = (int(x) for x in stats.tolist())
    return keys, values, rows, cols, dict(bounded=bounded, refined=refined, exact=exact, rows_end=rows_end)


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> None:
    """``x[:len(perm)] = x[perm]`` in place (``x`` [n, d] contiguous, ``perm`` a permutation of
    ``range(len(perm))``): reorders a large array without a second copy of it."""
    load().permute_rows_(x, perm.to(torch.long).contiguous())


def row_multiple() -> int:
    """Rows of the kernel's register block: ``ah`` and ``rt`` are padded to a multiple of it."""
    return int(load().MR)


__all__ = ["EXTENSION", "available", "availability", "bounded_scan", "load", "permute_rows", "row_multiple",
           "supports"]
