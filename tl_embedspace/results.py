"""Result dataclasses: token strings (visible spaces), values, ranks, ``.to_frame()``, ``_repr_html_()``.

Every result records the bases and layer-norm handling it was computed with (``basis``), because
the same weight reads differently through W_U^T, W_E or a pseudo-inverse.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch


def _basis_line(basis: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in basis.items())


class _Frame:
    """Mixin: notebooks render ``to_frame()`` with a title and the basis."""

    label: str
    basis: dict

    def to_frame(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return (f"<b>{html.escape(self.label)}</b><br><small>{html.escape(_basis_line(self.basis))}</small>"
                + self.to_frame().to_html(index=False))

    def __str__(self) -> str:
        return f"{self.label} [{_basis_line(self.basis)}]\n{self.to_frame().to_string(index=False)}"


@dataclass
class TokenScores(_Frame):
    """Top and bottom tokens of one vector projected to the vocabulary.

    ``top_ids``/``bottom_ids`` ``[k]`` and their scores; ``top_tokens``/``bottom_tokens`` are the
    token strings with visible spaces.
    """

    label: str
    top_ids: torch.Tensor
    top_values: torch.Tensor
    top_tokens: list[str]
    bottom_ids: torch.Tensor
    bottom_values: torch.Tensor
    bottom_tokens: list[str]
    basis: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        rows = []
        for side, ids, vals, toks in (("top", self.top_ids, self.top_values, self.top_tokens),
                                      ("bottom", self.bottom_ids, self.bottom_values, self.bottom_tokens)):
            for r, (i, v, t) in enumerate(zip(ids.tolist(), vals.tolist(), toks)):
                rows.append({"side": side, "rank": r + 1, "token": t, "id": i, "score": v})
        return pd.DataFrame(rows, columns=["side", "rank", "token", "id", "score"])

    @property
    def tokens(self) -> list[str]:
        return list(self.top_tokens)


@dataclass
class TokenPairs(_Frame):
    """Top entries of a vocab x vocab matrix: ``row_ids``, ``col_ids``, ``values`` ``[k]``, best first.

    For an OV circuit rows are source tokens and columns output tokens; for QK rows are query and
    columns key tokens. ``stats`` says how much of the product was computed.
    """

    label: str
    row_ids: torch.Tensor
    col_ids: torch.Tensor
    values: torch.Tensor
    row_tokens: list[str]
    col_tokens: list[str]
    mode: str = "largest"
    basis: dict = field(default_factory=dict)
    stats: Any = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "rank": range(1, len(self.values) + 1),
            "row_token": self.row_tokens, "col_token": self.col_tokens,
            "row_id": self.row_ids.tolist(), "col_id": self.col_ids.tolist(),
            "value": self.values.tolist(),
        })

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.row_ids.tolist(), self.col_ids.tolist()))


@dataclass
class RowTopk(_Frame):
    """Top-k columns of each of several rows: ``row_ids [n]``, ``col_ids``/``values [n, k]``."""

    label: str
    row_ids: torch.Tensor
    col_ids: torch.Tensor
    values: torch.Tensor
    token_str: Any = None
    basis: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        ts = self.token_str or str
        rows = []
        for r, rid in enumerate(self.row_ids.tolist()):
            for j in range(self.col_ids.shape[1]):
                cid = int(self.col_ids[r, j])
                rows.append({"row_token": ts(rid), "row_id": rid, "rank": j + 1, "col_token": ts(cid),
                             "col_id": cid, "value": float(self.values[r, j])})
        return pd.DataFrame(rows)


@dataclass
class ComponentHits(_Frame):
    """Neurons or heads ranked by how strongly they connect to given tokens.

    ``layers``, ``units`` (neuron or head index) and ``values`` ``[k]``, best first; ``kind``
    says what was scored ("value", "key", "gate" for neurons, "ov", "qk" for heads).
    """

    label: str
    unit_name: str
    layers: torch.Tensor
    units: torch.Tensor
    values: torch.Tensor
    kind: str = ""
    basis: dict = field(default_factory=dict)
    seconds: float | None = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"rank": range(1, len(self.values) + 1), "layer": self.layers.tolist(),
                             self.unit_name: self.units.tolist(), "value": self.values.tolist()})

    def names(self) -> list[str]:
        tag = "H" if self.unit_name == "head" else "N"
        return [f"L{l}{tag}{u}" for l, u in zip(self.layers.tolist(), self.units.tolist())]
