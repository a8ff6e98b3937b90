"""Choose the SGD learning rate per task on held-out demonstrations (never on the queries).

The papers tuned the learning rate per dataset. :func:`select_lr` does it on the task's
*demonstration pool* only: a seeded draw splits it into ``n_demos`` training demonstrations and
``n_heldout`` held-out ones (disjoint); for every learning rate of the grid it fine-tunes on the
training demonstrations exactly as :func:`~tl_iclgd.compare.compare` does (same method, same
settings) and scores the fine-tuned model zero-shot on the held-out demonstrations. The query pool
is never read, so the queries :func:`~tl_iclgd.compare.compare` evaluates stay unseen.

The chosen rate is the argmax of held-out accuracy; ties go to the lower mean held-out label loss
(cross-entropy of the gold label at the predicting position), then to the smaller rate. A rate
that diverges (parameters no longer finite) scores accuracy NaN and is never chosen. The held-out
zero-shot accuracy of the unchanged model is reported beside it (``zsl_acc``), so "fine-tuning
learns" (the chosen rate's accuracy above it) can be read off the table.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from tl_iclgd.capture import Capture, backend_of, capture
from tl_iclgd.gd import GDConfig, check_unprocessed, run_finetune
from tl_iclgd.tasks import Task, TokenizedTask, get_task, tokenize_task

DEFAULT_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class LRSelection:
    """The grid, each rate's held-out figures and the chosen rate.

    rows: one dict per rate: lr, heldout_acc (NaN if it diverged), heldout_loss (mean label
    cross-entropy), diverged. zsl_acc / zsl_loss: the unchanged model on the same held-out prompts.
    train / heldout: indices into the task's demonstration pool (disjoint).
    """

    task: str
    method: str
    lr: float
    rows: list
    zsl_acc: float
    zsl_loss: float
    train: tuple
    heldout: tuple
    seed: int

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows).assign(chosen=lambda d: d.lr == self.lr)

    def _repr_html_(self) -> str:
        return (f"<b>lr selection</b> ({self.task}, {self.method}): lr={self.lr:g}, held-out ZSL accuracy "
                f"{self.zsl_acc:.3f}" + self.to_frame().to_html(index=False))


def _label_scores(cap: Capture, gold: torch.Tensor, label_ids: Optional[Sequence[int]]) -> tuple[float, float]:
    """(accuracy, mean gold-label cross-entropy) at the predicting position; closed label sets score
    over their labels only (as :func:`~tl_iclgd.compare.predictions` does)."""
    logits = cap.logits.double()
    if label_ids is None:
        pred = logits.argmax(-1)
        loss = F.cross_entropy(logits, gold)
    else:
        ids = torch.tensor(list(label_ids))
        sub = logits[:, ids]
        pred = ids[sub.argmax(-1)]
        target = (gold[:, None] == ids[None, :]).double().argmax(-1)
        loss = F.cross_entropy(sub, target)
    return float((pred == gold).double().mean()), float(loss)


def split_demo_pool(n_pool: int, n_demos: int, n_heldout: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Seeded disjoint (train, held-out) index draws from a demonstration pool of ``n_pool``."""
    for arg, v in (("n_demos", n_demos), ("n_heldout", n_heldout)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg}: got {v!r}; accepted: a positive int")
    if n_demos + n_heldout > n_pool:
        raise ValueError(f"n_demos + n_heldout: got {n_demos} + {n_heldout}; the demonstration pool holds only "
                         f"{n_pool} pairs (the query pool is never used for selection)")
    idx = list(range(n_pool))
    random.Random(seed).shuffle(idx)
    return tuple(idx[:n_demos]), tuple(idx[n_demos:n_demos + n_heldout])


def select_lr(model: Any, task: Union[str, Task, TokenizedTask], grid: Sequence[float] = DEFAULT_GRID, *,
              method: str = "gd", gd: Optional[GDConfig] = None, n_demos: int = 32, n_heldout: int = 32,
              seed: int = 0, prepend_bos: Optional[bool] = None, batch_size: int = 64,
              log: Optional[Callable[[dict], Any]] = None) -> LRSelection:
    """Fine-tune on ``n_demos`` demonstrations at every rate of ``grid``; pick the best on ``n_heldout``
    other demonstrations of the same pool (see the module doc). Only ``task.demos`` is read.

    method: "gd" or "lcgd" (sets ``layer_causal``). gd: the other fine-tuning settings (its lr is
    ignored); default ``GDConfig()``. log: called with each row as it is computed (progress).
    Returns an :class:`LRSelection`.
    """
    if method not in ("gd", "lcgd"):
        raise ValueError(f"method: got {method!r}; accepted: 'gd', 'lcgd'")
    grid = tuple(grid)
    if not grid or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0
                       for x in grid):
        raise ValueError(f"grid: got {grid!r}; accepted: a non-empty sequence of finite numbers > 0")
    if len(set(grid)) != len(grid):
        raise ValueError(f"grid: got {grid!r}; accepted: distinct learning rates")
    gd = GDConfig() if gd is None else gd
    if not isinstance(gd, GDConfig):
        raise TypeError(f"gd: got {type(gd).__name__}; accepted: a tl_iclgd.GDConfig")
    check_unprocessed(model, gd.allow_processed)
    be = backend_of(model)
    name = task if isinstance(task, str) else getattr(task, "name", "custom")
    if isinstance(task, str):
        task = get_task(task)
    if isinstance(task, Task):
        train, held = split_demo_pool(len(task.demos), n_demos, n_heldout, seed)
        if prepend_bos is None:
            prepend_bos = be.default_prepend_bos
        sub = replace(task, demos=[task.demos[i] for i in train], queries=[task.demos[i] for i in held])
        ttask = tokenize_task(sub, be.tokenizer, prepend_bos=prepend_bos)
    elif isinstance(task, TokenizedTask):
        train, held = split_demo_pool(len(task.demos), n_demos, n_heldout, seed)
        ttask = replace(task, demos=tuple(task.demos[i] for i in train), queries=tuple(task.demos[i] for i in held))
    else:
        raise TypeError(f"task: got {type(task).__name__}; accepted: a built-in task name, a Task or a TokenizedTask")
    bos = ttask.bos_tokens()
    queries = [ttask.query_tokens(i) for i in range(len(ttask.queries))]
    off = ttask.predict_offset()
    gold = torch.tensor([q.label[0] for q in ttask.queries])
    zsl_acc, zsl_loss = _label_scores(capture(model, bos, queries, predict_offset=off, batch_size=batch_size),
                                      gold, ttask.label_ids)
    rows = []
    for lr in grid:
        cfg = replace(gd, lr=float(lr), layer_causal=(method == "lcgd"))
        row = {"lr": float(lr), "heldout_acc": math.nan, "heldout_loss": math.nan, "diverged": True}
        try:
            ft = run_finetune(model, ttask, cfg, record_inputs=False)
        except FloatingPointError:
            ft = None
        if ft is not None:
            cap = capture(model, bos, queries, params=ft.params, predict_offset=off, batch_size=batch_size)
            acc, loss = _label_scores(cap, gold, ttask.label_ids)
            if math.isfinite(loss):
                row = {"lr": float(lr), "heldout_acc": acc, "heldout_loss": loss, "diverged": False}
        rows.append(row)
        if log is not None:
            log(dict(row))
    ok = [r for r in rows if not r["diverged"]]
    if not ok:
        raise FloatingPointError(f"grid: every learning rate in {list(grid)} diverged; accepted: smaller rates")
    best = min(ok, key=lambda r: (-r["heldout_acc"], r["heldout_loss"], r["lr"]))
    return LRSelection(name, method, best["lr"], rows, zsl_acc, zsl_loss, train, held, seed)


__all__ = ["select_lr", "LRSelection", "split_demo_pool", "DEFAULT_GRID"]
