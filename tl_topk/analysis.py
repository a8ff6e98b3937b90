"""Model-level measurements: perplexity vs k (attention, feed-forward, both) and pattern sparsity.

Results are small dataclasses with ``.to_frame()``, ``.figure()`` (plotly) and ``_repr_html_()``.
Text is the standard library's Python documentation (``pydoc_data.topics``): real prose and code no
one here wrote, on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

import tl_plugins
from tl_plugins.corpus import docs_text, docs_tokens  # noqa: F401 - the text the analyses read, re-exported
from tl_topk.reference import paper_style_topk  # noqa: F401 - the paper's baseline, re-exported

MODES = ("attention", "feed-forward", "both")


@torch.no_grad()
def perplexity(model: Any, tokens: torch.Tensor) -> float:
    """exp(mean next-token loss) of ``model`` on ``tokens`` [batch, pos]."""
    return math.exp(float(model(tokens, return_type="loss")))


@dataclass
class PerplexitySweep:
    """Perplexity of one model on one text for each (mode, k); ``ratio`` is to the dense model."""

    model_name: str
    n_tokens: int
    dense: float
    rows: list[dict] = field(default_factory=list)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        df = self.to_frame()
        for mode in MODES:
            d = df[df["mode"] == mode]
            if len(d):
                fig.add_trace(go.Scatter(x=d["k"], y=d["perplexity"], mode="lines+markers", name=mode))
        fig.add_hline(y=self.dense, line_dash="dot", annotation_text="dense")
        fig.update_layout(title=f"{self.model_name}: perplexity vs k ({self.n_tokens} tokens of Python docs)",
                          xaxis_title="k (keys per query / units per token)", yaxis_title="perplexity",
                          xaxis_type="log", yaxis_type="log", height=420)
        return fig

    def _repr_html_(self) -> str:
        return (f"<h4>perplexity vs k: {self.model_name}, {self.n_tokens} tokens, dense {self.dense:.3f}</h4>"
                + self.to_frame().to_html(index=False))


def perplexity_sweep(model: Any, tokens: torch.Tensor, ks: Sequence[Any], *, modes: Iterable[str] = MODES,
                     model_name: str = "", progress=None, backend: str = "auto",
                     ff_rule: str = "value", layers: Optional[Sequence[int]] = None) -> PerplexitySweep:
    """Perplexity with top-k attention, top-k feed-forward, or both, for each k in ``ks``.

    ``ks`` entries are ints or ``"n"`` (dense: every key / every unit). ``layers`` limits top-k to
    those layers (the plugin's ``layers=``; None = all). The model is left as it was.
    """
    if tl_plugins.active(model).get("topk") is not None:
        raise ValueError("model: the topk plugin is already enabled; disable it before a sweep")
    dense = perplexity(model, tokens)
    sweep = PerplexitySweep(model_name, tokens.shape[1], dense)
    jobs = [(m, k) for m in modes for k in ks]
    for mode, k in (progress(jobs, "topk perplexity") if progress else jobs):
        if mode not in MODES:
            raise ValueError(f"modes: got {mode!r}; accepted: {', '.join(MODES)}")
        if k == "n":
            ppl = dense
        else:
            opts = {"attention": dict(k=k), "feed-forward": dict(ff_k=k, ff_rule=ff_rule),
                    "both": dict(k=k, ff_k=k, ff_rule=ff_rule)}[mode]
            with tl_plugins.enabled(model, "topk", backend=backend, layers=layers, **opts):
                ppl = perplexity(model, tokens)
        sweep.rows.append(dict(mode=mode, k=str(k) if k == "n" else int(k), perplexity=ppl,
                               ratio=ppl / dense))
    return sweep


@dataclass
class PatternSparsity:
    """Per layer: non-zeros per row under top-k, and the dense pattern's mass inside its top k."""

    model_name: str
    k: int
    n_tokens: int
    rows: list[dict] = field(default_factory=list)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def figure(self):
        import plotly.graph_objects as go

        df = self.to_frame()
        fig = go.Figure([go.Bar(x=df["layer"], y=df["dense_mass_in_topk"], name="dense mass in top-k")])
        fig.update_layout(title=f"{self.model_name}: share of each layer's dense attention inside its top-{self.k}",
                          xaxis_title="layer", yaxis_title="mean mass", yaxis_range=[0, 1], height=360)
        return fig

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False)


@torch.no_grad()
def pattern_sparsity(model: Any, tokens: torch.Tensor, k: int, model_name: str = "") -> PatternSparsity:
    """One dense run and one top-k run with the patterns cached; per-layer statistics."""
    names = lambda n: n.endswith("hook_pattern")  # noqa: E731
    _, dense = model.run_with_cache(tokens, names_filter=names)
    with tl_plugins.enabled(model, "topk", k=k):
        _, sparse = model.run_with_cache(tokens, names_filter=names)
    out = PatternSparsity(model_name, k, tokens.shape[1])
    for layer in range(model.cfg.n_layers):
        p = dense["pattern", layer]
        s = sparse["pattern", layer]
        kk = min(k, p.shape[-1])
        mass = p.topk(kk, dim=-1).values.sum(-1)
        out.rows.append(dict(
            layer=layer,
            nonzeros_per_row=float((s > 0).sum(-1).float().mean()),
            max_nonzeros=int((s > 0).sum(-1).max()),
            dense_mass_in_topk=float(mass.mean()),
            worst_head_mass=float(mass.mean(dim=(0, 2)).min()),
        ))
    return out
