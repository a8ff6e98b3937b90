"""Two to four sentences for the iclgd report section, computed from its own numbers."""

from __future__ import annotations

import re
from typing import Any, Optional


def _num(x: Any) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    m = re.match(r"\s*(-?[\d.]+(?:e-?\d+)?)", str(x))
    return float(m.group(1)) if m else float("nan")


def summary_sentences(res: Any, curve_df: Optional[Any] = None) -> str:
    t = res.table()
    row = lambda v, m: t[(t["variant"] == v) & (t["method"] == m)]  # noqa: E731
    out = []
    tr = row("trained", "gd")
    if len(tr):
        r = tr.iloc[0]
        zsl, icl, ft = _num(r["ZSL_acc"]), _num(r["ICL_acc"]), _num(r["FT_acc"])
        out.append(f"Accuracy: zero-shot {zsl:.2f}, in-context {icl:.2f}, fine-tuned (GD) {ft:.2f}"
                   + (" — fine-tuning learned nothing here, so Rec2FTP and SimAM say little."
                      if ft <= zsl else "."))
        sim, simr = _num(r["SimAOU"]), _num(r["SimAOU_random"])
        out.append(f"SimAOU (GD) is {sim:.3f} against {simr:.3f} for random updates; SimAM_delta {_num(r['SimAM_delta']):+.3f}.")
    un = row("untrained", "gd")
    if len(tr) and len(un):
        a, b = _num(tr.iloc[0]["SimAOU"]), _num(un.iloc[0]["SimAOU"])
        out.append(f"An untrained model scores SimAOU {b:.3f} ({'as high or higher' if b >= a else 'lower'}), "
                   + ("so the metric does not by itself show a learned ICL-GD agreement."
                      if b >= 0.8 * a else "so part of the agreement is learned."))
    if curve_df is not None and len(curve_df):
        c = curve_df.sort_values("n_demos")
        out.append(f"ICL accuracy rises from {c['accuracy'].iloc[0]:.2f} at {int(c['n_demos'].iloc[0])} "
                   f"demonstrations to {c['accuracy'].iloc[-1]:.2f} at {int(c['n_demos'].iloc[-1])}.")
    return " ".join(out[:4])
