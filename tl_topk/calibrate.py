"""``tl_topk.calibrate``: choose k per (layer, head) from attention mass on calibration text, for a
perplexity budget.

One dense forward with a hook on every ``hook_pattern`` measures, per head, how much of each row's
attention mass its top keys hold (rows sorted descending, cumulative sums averaged over rows). A
*rule* turns one threshold ``t`` into a k per head:

* ``"mass"``: the smallest k whose mean top-k mass (over the head's rows) reaches ``t``;
* ``"top-p"``: the mean over the head's rows of the number of keys each row needs for cumulative
  mass ``t`` (the per-row top-p rule, made static per head), rounded up.

For each rule the threshold is bisected over ``THRESHOLDS`` against the measured perplexity of the
model with ``topk`` enabled on the calibration tokens: the smallest threshold (fewest keys) whose
perplexity stays within ``budget`` of dense wins. ``rule="auto"`` runs both and keeps the one that
meets the budget with the smaller mean k. Heads whose k reaches the calibration length stay dense.

    result = tl_topk.calibrate(model, tokens, budget=0.01)
    tl_plugins.enable(model, "topk", k=result.k)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import tl_plugins

RULES = ("mass", "top-p")
# Candidate thresholds, fewest keys first.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.965, 0.975, 0.985, 0.99, 0.995, 0.998)


@dataclass
class CalibrationResult:
    """What ``calibrate`` chose.

    Attributes:
        k: per-(layer, head) spec ``{(layer, head): k}`` for ``enable(model, "topk", k=...)``; heads
            not listed stay dense.
        mean_k: mean over every (layer, head) of its k, dense heads counted as the calibration length.
        rule, threshold: the rule and threshold that gave ``k``.
        budget: the allowed relative perplexity increase on the calibration tokens.
        dense_perplexity, perplexity: on the calibration tokens, without and with ``k``.
        met: whether ``perplexity <= dense_perplexity * (1 + budget)``.
        n_tokens: calibration positions per sequence.
        rows: the table behind ``k``: one row per (layer, head) with its k, the mean top-k mass at
            that k, and the k each rule gives at each threshold tried.
        tried: one row per evaluated (rule, threshold): mean k, perplexity, ratio to dense.
        by_rule: the best result of each rule (rule -> dict of threshold, mean_k, ratio, met).
    """

    k: dict
    mean_k: float
    rule: str
    threshold: float
    budget: float
    dense_perplexity: float
    perplexity: float
    met: bool
    n_tokens: int
    rows: list[dict] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)
    by_rule: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.perplexity / self.dense_perplexity

    def to_frame(self):
        """The per-(layer, head) table: layer, head, k (None = dense), mass_at_k."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def tried_frame(self):
        import pandas as pd

        return pd.DataFrame(self.tried)

    def _repr_html_(self) -> str:
        head = (f"<p>rule {self.rule} at threshold {self.threshold}: mean k {self.mean_k:.1f} over "
                f"{len(self.rows)} heads; perplexity {self.perplexity:.4f} vs dense {self.dense_perplexity:.4f} "
                f"({(self.ratio - 1) * 100:+.2f} %, budget {self.budget * 100:.2f} %)</p>")
        return head + self.tried_frame().to_html(index=False)


def _check(tokens: Any, budget: Any, rule: str) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise TypeError(f"tokens: got {type(tokens).__name__} "
                        f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else ''}; "
                        "accepted: an integer tensor [batch, pos]")
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens: got {tokens.shape[1]} positions; accepted: at least 2")
    if (isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget)
            or not budget > 0):
        raise ValueError(f"budget: got {budget!r}; accepted: a finite number > 0 (0.01 = 1 % perplexity)")
    if rule not in RULES + ("auto",):
        raise ValueError(f"rule: got {rule!r}; accepted: auto, {', '.join(RULES)}")


@torch.no_grad()
def attention_mass(model: Any, tokens: torch.Tensor, thresholds=THRESHOLDS, block: int = 256):
    """Per-head mass statistics from one dense forward.

    Returns ``(curve, need)``: ``curve`` [n_layers, n_heads, pos] float64, the mean over rows (batch
    and query positions) of the attention mass in each row's top ``j + 1`` keys; ``need`` [n_layers,
    n_heads, len(thresholds)], the mean over rows of the keys a row needs to reach each cumulative
    mass. Query rows are sorted in blocks of ``block``, so no temporary exceeds [batch, head, block, pos].
    """
    n_layers = model.cfg.n_layers
    curve: dict[int, torch.Tensor] = {}
    need: dict[int, torch.Tensor] = {}
    p = torch.tensor(thresholds, dtype=torch.float64)

    def hook(pattern, hook):
        layer = int(hook.name.split(".")[1])
        b, h, n_q, n_k = pattern.shape
        total = torch.zeros(h, n_k, dtype=torch.float64)
        counts = torch.zeros(h, len(thresholds), dtype=torch.float64)
        for q0 in range(0, n_q, block):
            c = pattern[:, :, q0:q0 + block].detach().to(torch.float64).sort(-1, descending=True).values.cumsum(-1)
            total += c.sum((0, 2))
            # keys needed for mass t = 1 + number of prefixes still below t (the 1e-9 absorbs rounding)
            counts += ((c.unsqueeze(-1) < (p - 1e-9)).sum(-2) + 1).clamp(max=n_k).to(torch.float64).sum((0, 2))
            del c
        curve[layer] = total / (b * n_q)
        need[layer] = counts / (b * n_q)
        return None

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), hook)])
    missing = [x for x in range(n_layers) if x not in curve]
    if missing:
        raise RuntimeError(f"model: no hook_pattern fired for layers {missing}")
    return (torch.stack([curve[x] for x in range(n_layers)]), torch.stack([need[x] for x in range(n_layers)]))


def rule_k(curve: torch.Tensor, need: torch.Tensor, rule: str, index: int,
           thresholds=THRESHOLDS) -> torch.Tensor:
    """k per (layer, head), [n_layers, n_heads] int64 in 1..pos, for ``thresholds[index]``."""
    n = curve.shape[-1]
    if rule == "mass":
        t = thresholds[index]
        reached = curve >= t - 1e-9
        k = torch.where(reached.any(-1), reached.to(torch.int8).argmax(-1) + 1, torch.full_like(curve[..., 0], n,
                                                                                                dtype=torch.long))
        return k.to(torch.long)
    return need[..., index].ceil().clamp(1, n).to(torch.long)


def _spec(k: torch.Tensor, n: int) -> dict:
    return {(layer, head): int(k[layer, head]) for layer in range(k.shape[0]) for head in range(k.shape[1])
            if int(k[layer, head]) < n}


def _perplexity(model: Any, tokens: torch.Tensor, spec: Optional[dict], backend: str) -> float:
    from tl_topk.analysis import perplexity

    if not spec:
        return perplexity(model, tokens)
    with tl_plugins.enabled(model, "topk", k=spec, backend=backend):
        return perplexity(model, tokens)


def _search_rule(model: Any, tokens: torch.Tensor, curve: torch.Tensor, need: torch.Tensor, r: str, dense: float,
                 limit: float, backend: str, tried: list) -> dict:
    """Bisect ``THRESHOLDS`` for rule ``r``: the evaluated entry (row, spec, k) with the smallest mean
    k among those whose perplexity is within ``limit``, or the largest threshold's entry when even it
    misses. Each evaluation appends its row to ``tried``."""
    n = tokens.shape[1]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    cache: dict[int, dict] = {}

    def evaluate(i: int) -> dict:
        if i not in cache:
            k = rule_k(curve, need, r, i)
            spec = _spec(k, n)
            ppl = _perplexity(model, tokens, spec, backend)
            row = dict(rule=r, threshold=THRESHOLDS[i], mean_k=float(k.clamp(max=n).float().mean()),
                       dense_heads=n_layers * n_heads - len(spec), perplexity=ppl, ratio=ppl / dense,
                       met=ppl <= limit)
            cache[i] = dict(row, spec=spec, k=k)
            tried.append(row)
        return cache[i]

    lo, hi = 0, len(THRESHOLDS) - 1
    if not evaluate(hi)["met"]:
        return cache[hi]
    # the smallest index that meets the budget, assuming the ratio falls as the threshold rises
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid)["met"]:
            hi = mid
        else:
            lo = mid + 1
    met = [c for c in cache.values() if c["met"]]
    return min(met, key=lambda c: c["mean_k"])


def _per_head_rows(k: torch.Tensor, curve: torch.Tensor, need: torch.Tensor, best: dict, n: int) -> list:
    """``CalibrationResult.rows``: per (layer, head) the chosen k (None = dense), the attention mass
    it keeps, and each rule's k at that rule's chosen threshold."""
    n_layers, n_heads = k.shape
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            kk = int(k[layer, head])
            row = dict(layer=layer, head=head, k=kk if kk < n else None,
                       mass_at_k=float(curve[layer, head, min(kk, n) - 1]))
            for r in best:
                row[f"k_{r}"] = int(rule_k(curve, need, r, THRESHOLDS.index(best[r]["threshold"]))[layer, head])
            rows.append(row)
    return rows


def calibrate(model: Any, tokens: torch.Tensor, budget: float = 0.01, *, rule: str = "auto",
              backend: str = "auto", progress: Optional[Callable] = None) -> CalibrationResult:
    """Choose k per (layer, head) to stay within ``budget`` of dense perplexity on ``tokens`` at the
    smallest mean k (see the module docstring).

    Args:
        model: a HookedTransformer or TransformerBridge (no plugin changing attention enabled).
        tokens: [batch, pos] calibration tokens (evaluate the result on other text).
        budget: allowed relative perplexity increase on ``tokens`` (0.01 = 1 %).
        rule: "mass", "top-p" or "auto" (both; the one with the smaller mean k that meets the budget).
        backend: the topk backend used for the perplexity evaluations.
        progress: optional ``progress(iterable, description)`` wrapper (tqdm).

    Returns:
        CalibrationResult; ``.met`` is False when even the largest threshold misses the budget
        (then ``.k`` is the best tried).
    """
    _check(tokens, budget, rule)
    if "topk" in tl_plugins.active(model):
        raise ValueError("model: topk is already enabled; calibrate measures the dense model and enables "
                         "topk itself: disable it first")
    n = tokens.shape[1]
    curve, need = attention_mass(model, tokens)
    dense = _perplexity(model, tokens, None, backend)
    rules = RULES if rule == "auto" else (rule,)
    tried: list[dict] = []
    best = {r: _search_rule(model, tokens, curve, need, r, dense, dense * (1 + budget), backend, tried)
            for r in (progress(rules, "calibrate") if progress else rules)}
    winners = [b for b in best.values() if b["met"]] or list(best.values())
    win = min(winners, key=lambda c: (not c["met"], c["mean_k"] if c["met"] else c["ratio"]))
    rows = _per_head_rows(win["k"], curve, need, best, n)
    return CalibrationResult(
        k=win["spec"], mean_k=win["mean_k"], rule=win["rule"], threshold=win["threshold"], budget=float(budget),
        dense_perplexity=dense, perplexity=win["perplexity"], met=bool(win["met"]), n_tokens=n, rows=rows,
        tried=tried, by_rule={r: {key: b[key] for key in ("threshold", "mean_k", "perplexity", "ratio", "met")}
                              for r, b in best.items()})


__all__ = ["calibrate", "CalibrationResult", "attention_mass", "rule_k", "RULES", "THRESHOLDS"]
