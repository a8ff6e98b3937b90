"""The whole ICL vs GD comparison: ZSL, ICL and FT (per method) on one task, metrics per layer and overall.

``compare(model, task, gd=GDConfig(...), methods=("gd", "lcgd"), baselines=("untrained",
"untrained_embeddings"))`` runs, for every seed (a seeded draw of demonstrations and queries) and every
model variant (the model itself and each untrained baseline, one seeded initialisation per seed shared
by the variant's ZSL, ICL and FT runs):

- ZSL: each query alone; ICL: the demonstrations (run once into a key-value cache) then each query;
  FT: each query alone with the fine-tuned K/V of each method;
- per layer: SimAOU (raw and normalised) and their random-update baselines, SimAM before and after FT,
  SimAM_delta, Kendall tau (ICL attention over demonstration tokens vs the FT dual-form attention
  to the training tokens); per run: accuracies, Rec2FTP and its chance baseline, and how many
  demonstrations ICL saw vs GD.

Aggregation as in the papers: per example, then the mean over examples (NaNs from zero updates are
dropped and counted in ``n_nan``), then the mean over layers; mean and std over seeds.

Kendall tau, as read here: the FT side is the dual form of the V update (Dai et al.): the update
applied to the query input x_q is a sum over training tokens i weighted by x_i . x_q (x = the
attention layer's input), so x_i . x_q is the "attention" of the query to training token i.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from tl_iclgd import metrics as M
from tl_iclgd.baselines import random_updates_like, untrained_like
from tl_iclgd.capture import Capture, backend_of, capture
from tl_iclgd.gd import GDConfig, check_unprocessed, run_finetune
from tl_iclgd.tasks import Task, TokenizedTask, draw_subset, get_task, tokenize_task
from tl_iclgd.threads import torch_threads

METHODS = ("gd", "lcgd")
BASELINES = {"untrained": "none", "untrained_embeddings": "embeddings"}
LAYER_METRICS = ("SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_norm_random", "SimAM_before", "SimAM_after",
                 "SimAM_delta", "Kendall_tau")
RUN_METRICS = ("ZSL_acc", "ICL_acc", "FT_acc", "Rec2FTP", "Rec2FTP_chance", "n_demos_icl", "n_demos_gd",
               "ft_loss_first", "ft_loss_last")


@dataclass
class Comparison:
    """Results of :func:`compare`, in long form.

    layers: one row per (variant, method, seed, layer, metric): value (mean over examples) and n_nan
    (examples dropped because an update was exactly zero). runs: one row per (variant, method, seed,
    metric) for run-level figures (accuracies, Rec2FTP, demo counts). settings: what was run.
    """

    layers: Any  # pandas.DataFrame
    runs: Any    # pandas.DataFrame
    settings: dict = field(default_factory=dict)

    def to_frame(self, level: str = "aggregate"):
        """"aggregate": (variant, method, metric) -> mean, std over seeds of the layer-mean, n_nan.
        "layer": (variant, method, layer, metric) -> mean, std over seeds. "runs": run-level figures."""
        import pandas as pd

        if level == "layer":
            g = self.layers.groupby(["variant", "method", "layer", "metric"], sort=False)
            return g.agg(mean=("value", "mean"), std=("value", _std), n_nan=("n_nan", "sum")).reset_index()
        if level == "runs":
            g = self.runs.groupby(["variant", "method", "metric"], sort=False)
            return g.agg(mean=("value", "mean"), std=("value", _std)).reset_index()
        if level != "aggregate":
            raise ValueError(f"level: got {level!r}; accepted: 'aggregate', 'layer', 'runs'")
        per_seed = self.layers.groupby(["variant", "method", "seed", "metric"], sort=False).agg(
            value=("value", "mean"), n_nan=("n_nan", "sum")).reset_index()
        both = pd.concat([per_seed, self.runs.assign(n_nan=0)], ignore_index=True)
        g = both.groupby(["variant", "method", "metric"], sort=False)
        return g.agg(mean=("value", "mean"), std=("value", _std), n_nan=("n_nan", "sum")).reset_index()

    def table(self, metrics: Optional[Sequence[str]] = None):
        """Wide table: one row per (variant, method), one column per metric, "mean ± std" over seeds."""
        agg = self.to_frame()
        if metrics is not None:
            agg = agg[agg.metric.isin(list(metrics))]
        cell = agg.apply(lambda r: _fmt(r["mean"], r["std"]), axis=1)
        wide = agg.assign(cell=cell).pivot_table(index=["variant", "method"], columns="metric", values="cell",
                                                 aggfunc="first", sort=False)
        order = [m for m in (*LAYER_METRICS, *RUN_METRICS) if m in wide.columns]
        return wide[order].reset_index()

    def zero_updates(self):
        """(variant, method, metric) -> examples dropped as zero updates, summed over layers and seeds."""
        agg = self.to_frame()
        return agg[agg.n_nan > 0][["variant", "method", "metric", "n_nan"]]

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings,
                           "aggregate": self.to_frame().to_dict(orient="records"),
                           "layers": self.layers.to_dict(orient="records"),
                           "runs": self.runs.to_dict(orient="records")}, indent=1, default=_json_default)

    def _repr_html_(self) -> str:
        return "<b>ICL vs GD comparison</b> " + json.dumps(self.settings, default=str) + self.table().to_html()


def _std(x):
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _fmt(mean: float, std: float) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "nan"
    return f"{mean:.3f}" if (isinstance(std, float) and math.isnan(std)) else f"{mean:.3f} ± {std:.3f}"


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# -- helpers ----------------------------------------------------------------------------------------

def active_config(model: Any) -> GDConfig:
    """The settings given to ``tl_plugins.enable(model, "iclgd", ...)``, else ``GDConfig()``."""
    import tl_plugins

    return tl_plugins.active(model).get("iclgd") or GDConfig()


def resolve_task(model: Any, task: Union[str, Task, TokenizedTask], seed: int, n_demos: Optional[int],
                 n_queries: Optional[int], position: str, prepend_bos: bool,
                 single_token_labels: bool) -> TokenizedTask:
    """The TokenizedTask one seed runs on: a built-in name or a Task sampled and tokenised, a
    TokenizedTask subset (``n_demos`` demonstrations, ``n_queries`` queries drawn with ``seed``)."""
    if isinstance(task, str):
        task = get_task(task)
    if isinstance(task, Task):
        return tokenize_task(task.sample(n_demos, n_queries, seed), backend_of(model).tokenizer, position=position,
                             prepend_bos=prepend_bos, single_token_labels=single_token_labels)
    if isinstance(task, TokenizedTask):
        import random

        rng = random.Random(seed)
        d = draw_subset(list(range(len(task.demos))), n_demos, rng, "n_demos")
        q = draw_subset(list(range(len(task.queries))), n_queries, rng, "n_queries")
        return task.subset(d, q).with_position(position)
    raise TypeError(f"task: got {type(task).__name__}; accepted: a built-in task name, a Task or a TokenizedTask")


def default_prepend_bos(model: Any, task: Union[str, Task, TokenizedTask]) -> bool:
    """prepend_bos=None: the model's default for tasks tokenised here; a TokenizedTask keeps its own BOS."""
    return backend_of(model).default_prepend_bos and isinstance(task, (str, Task))


def task_name(task: Union[str, Task, TokenizedTask]) -> str:
    """The name results record for ``task`` ("custom" for an unnamed TokenizedTask)."""
    return task if isinstance(task, str) else getattr(task, "name", "custom")


def predictions(cap: Capture, label_ids: Optional[Sequence[int]]) -> torch.Tensor:
    """[N] predicted token ids: argmax over the vocabulary, or over ``label_ids`` for closed label sets."""
    if label_ids is None:
        return cap.logits.argmax(-1)
    ids = torch.tensor(list(label_ids))
    return ids[cap.logits[:, ids].argmax(-1)]


def _per_query_heads(fn, *tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply a [L, H, n_q]-wise metric per query and average over heads (NaN-aware) -> [N, L]."""
    out = []
    for parts in zip(*tensors):
        out.append(torch.nanmean(fn(*parts), dim=-1))  # [L, H] -> [L]; NaN where every head is NaN
    return torch.stack(out)


def _kendall(icl: Capture, ft: Capture, inputs: list[torch.Tensor], trace_demos: list[int], ttask: TokenizedTask,
             k: int) -> torch.Tensor:
    """[N, L] Kendall tau between ICL attention over demo tokens and the FT dual attention x_i . x_q."""
    n_gd = len(ttask.demos)
    first_step = {}
    for step, j in enumerate(trace_demos):
        first_step.setdefault(j, step)
    skip = len(ttask.bos_tokens())
    xs = [inputs[first_step[j]][skip:] for j in range(n_gd - k, n_gd)]  # ICL saw the last k demos
    X = torch.cat(xs, dim=0)  # [P, L, d]
    dual = torch.einsum("pld,nld->nlp", X.double(), ft.attn_in.double())  # [N, L, P]
    pat = icl.demo_pattern.double()  # [N, L, P]
    if pat.shape != dual.shape:
        raise RuntimeError(f"Kendall: ICL demo tokens {tuple(pat.shape)} do not align with training tokens "
                           f"{tuple(dual.shape)}")
    return torch.stack([M.kendall_tau(pat[:, layer], dual[:, layer]) for layer in range(pat.shape[1])], dim=1)


def _layer_rows(rows: list, base: dict, name: str, per_example: torch.Tensor) -> None:
    """per_example [N, L] -> one row per layer (mean over examples, NaNs counted)."""
    for layer in range(per_example.shape[1]):
        col = per_example[:, layer]
        nm = M.nan_mean(col)
        rows.append({**base, "layer": layer, "metric": name, "value": float(nm.value), "n_nan": nm.n_nan})


# -- the pipeline -----------------------------------------------------------------------------------

def run_variant(model: Any, ttask: TokenizedTask, configs: Sequence[GDConfig], *, seed: int,
                context_budget: Optional[int], batch_size: int, kendall: bool, variant: str,
                layer_rows: list, run_rows: list) -> None:
    """ZSL, ICL and FT for one model and one tokenised task; appends rows (see :class:`Comparison`).

    The caller checks the weights are unprocessed (:func:`~tl_iclgd.gd.check_unprocessed`), as :func:`compare`
    does once for every variant, seed and method.
    """
    k = ttask.icl_budget(backend_of(model).n_ctx, context_budget)
    bos = ttask.bos_tokens()
    queries = [ttask.query_tokens(i) for i in range(len(ttask.queries))]
    off = ttask.predict_offset()
    zsl = capture(model, bos, queries, predict_offset=off, batch_size=batch_size)
    icl = capture(model, ttask.prefix_tokens(k), queries, predict_offset=off, batch_size=batch_size,
                  demo_start=len(bos) if kendall else None)
    gold = torch.tensor([q.label[0] for q in ttask.queries])
    zsl_ok = predictions(zsl, ttask.label_ids) == gold
    icl_ok = predictions(icl, ttask.label_ids) == gold
    m_zsl, m_icl = zsl.scores, icl.scores
    simam_before = _per_query_heads(M.simam, m_icl, m_zsl)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for cfg in configs:
        base = {"variant": variant, "method": cfg.method, "seed": seed}
        ft_res = run_finetune(model, ttask, cfg, record_inputs=kendall)
        ft = capture(model, bos, queries, params=ft_res.params, predict_offset=off, batch_size=batch_size,
                     want_attn_in=kendall)
        ft_ok = predictions(ft, ttask.label_ids) == gold
        h_rand = random_updates_like(zsl.attn_out, ft.attn_out, generator=gen)
        per = {
            "SimAOU": M.simaou(icl.attn_out, zsl.attn_out, ft.attn_out),
            "SimAOU_norm": M.simaou(icl.attn_out, zsl.attn_out, ft.attn_out, normalise=True),
            "SimAOU_random": M.simaou(icl.attn_out, zsl.attn_out, h_rand),
            "SimAOU_norm_random": M.simaou(icl.attn_out, zsl.attn_out, h_rand, normalise=True),
            "SimAM_before": simam_before,
            "SimAM_after": _per_query_heads(M.simam, m_icl, ft.scores),
            "SimAM_delta": _per_query_heads(M.simam_delta, m_icl, m_zsl, ft.scores),
        }
        if kendall:
            per["Kendall_tau"] = _kendall(icl, ft, ft_res.attn_inputs, ft_res.trace.demo, ttask, k)
        for name, val in per.items():
            _layer_rows(layer_rows, base, name, val)
        r = M.rec2ftp(zsl_ok, icl_ok, ft_ok)
        scal = {"ZSL_acc": float(zsl_ok.float().mean()), "ICL_acc": float(icl_ok.float().mean()),
                "FT_acc": float(ft_ok.float().mean()), "Rec2FTP": r.value, "Rec2FTP_chance": r.chance,
                "n_demos_icl": k, "n_demos_gd": len(ttask.demos),
                "ft_loss_first": float(ft_res.trace.loss[0]), "ft_loss_last": float(ft_res.trace.loss[-1])}
        for name, v in scal.items():
            run_rows.append({**base, "metric": name, "value": float(v)})


def compare(model: Any, task: Union[str, Task, TokenizedTask], gd: Optional[GDConfig] = None, *,
            methods: Sequence[str] = METHODS, baselines: Sequence[str] = (), n_demos: Optional[int] = 16,
            n_queries: Optional[int] = 50, seeds: Sequence[int] = (0,), position: str = "prompt_end",
            prepend_bos: Optional[bool] = None, context_budget: Optional[int] = None,
            single_token_labels: bool = True, batch_size: int = 64, kendall: bool = True,
            progress: bool = False, num_threads: Optional[int] = None,
            lrs: Optional[dict] = None) -> Comparison:
    """Run ZSL, ICL and FT (each method) on ``task`` and compute every metric (see the module doc).

    gd: the shared fine-tuning settings; ``methods`` picks vanilla GD ("gd") and/or layer-causal GD
    ("lcgd"), overriding ``gd.layer_causal``. baselines: any of "untrained", "untrained_embeddings".
    n_demos / n_queries: drawn from the task's pools per seed (None = all). context_budget: tokens
    ICL may use (default: the model's n_ctx); ICL keeps the last demonstrations that fit and GD trains
    on all of them; the counts are reported as n_demos_icl / n_demos_gd. gd=None takes the settings
    given to ``tl_plugins.enable(model, "iclgd", ...)`` if any, else ``GDConfig()``.
    num_threads: torch threads for the run (restored after); 1 is much faster on an oversubscribed CPU.
    lrs: per-method learning rates overriding ``gd.lr`` (e.g. ``{"gd": 1e-3, "lcgd": 3e-4}`` from
    :func:`tl_iclgd.lr_select.select_lr`); baselines use the same rate as the model for each method.
    """
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads: got {num_threads!r}; accepted: None or an int >= 1")
    with torch_threads(num_threads) if num_threads is not None else nullcontext():
        return _compare(model, task, gd, methods=methods, baselines=baselines, n_demos=n_demos,
                        n_queries=n_queries, seeds=seeds, position=position, prepend_bos=prepend_bos,
                        context_budget=context_budget, single_token_labels=single_token_labels,
                        batch_size=batch_size, kendall=kendall, progress=progress, lrs=lrs)


def _compare(model: Any, task: Union[str, Task, TokenizedTask], gd: Optional[GDConfig], *,
             methods: Sequence[str], baselines: Sequence[str], n_demos: Optional[int], n_queries: Optional[int],
             seeds: Sequence[int], position: str, prepend_bos: Optional[bool], context_budget: Optional[int],
             single_token_labels: bool, batch_size: int, kendall: bool, progress: bool,
             lrs: Optional[dict] = None) -> Comparison:
    """:func:`compare` with the torch thread count already set."""
    from dataclasses import replace

    import pandas as pd

    if gd is None:
        gd = active_config(model)
    if not isinstance(gd, GDConfig):
        raise TypeError(f"gd: got {type(gd).__name__}; accepted: a tl_iclgd.GDConfig")
    methods = tuple(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: got {methods!r}; accepted: a non-empty subset of {METHODS}")
    baselines = tuple(baselines)
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baselines: got {bad!r}; accepted: any of {tuple(BASELINES)}")
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds: got {seeds!r}; accepted: a non-empty sequence of ints")
    check_unprocessed(model, gd.allow_processed)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, task)
    lrs = dict(lrs or {})
    if any(m not in methods for m in lrs):
        raise ValueError(f"lrs: got keys {sorted(lrs)}; accepted: methods of this run {methods}")
    configs = [replace(gd, layer_causal=(m == "lcgd"), lr=lrs.get(m, gd.lr)) for m in methods]
    layer_rows: list = []
    run_rows: list = []
    t0 = time.perf_counter()
    variants = [("trained", None)] + [(b, BASELINES[b]) for b in baselines]
    steps = [(v, s) for v in variants for s in seeds]
    it = steps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(steps, desc="iclgd compare", leave=False)
    for (variant, keep), seed in it:
        ttask = resolve_task(model, task, seed, n_demos, n_queries, position, prepend_bos, single_token_labels)
        m = model if keep is None else untrained_like(model, keep=keep, seed=seed)
        run_variant(m, ttask, configs, seed=seed, context_budget=context_budget, batch_size=batch_size,
                    kendall=kendall, variant=variant, layer_rows=layer_rows, run_rows=run_rows)
        if m is not model:
            del m
            gc.collect()  # free the baseline model before the next one is built (peak memory)
    settings = {"task": task_name(task),
                "n_demos": n_demos, "n_queries": n_queries, "seeds": list(seeds), "position": position,
                "methods": list(methods), "baselines": list(baselines),
                "lr": gd.lr if not lrs else {c.method: c.lr for c in configs}, "params": gd.params,
                "loss": gd.loss, "order": gd.order, "readout": gd.readout, "epochs": gd.epochs,
                "prepend_bos": prepend_bos, "context_budget": context_budget,
                "n_layers": backend_of(model).n_layers, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 2)}
    return Comparison(pd.DataFrame(layer_rows), pd.DataFrame(run_rows), settings)


# -- ICL accuracy vs number of demonstrations -------------------------------------------------------

@dataclass
class AccuracyCurve:
    """ICL accuracy per number of demonstrations: rows (n_demos, seed, accuracy)."""

    rows: list
    task: str

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.rows)
        return df.groupby("n_demos").agg(accuracy=("accuracy", "mean"), std=("accuracy", _std),
                                         n_queries=("n_queries", "first")).reset_index()

    def _repr_html_(self) -> str:
        return f"<b>ICL accuracy on {self.task}</b>" + self.to_frame().to_html(index=False)


def icl_accuracy_curve(model: Any, task: Union[str, Task, TokenizedTask] = "antonyms",
                       n_demos: Sequence[int] = (0, 1, 2, 4, 8, 16), n_queries: int = 20,
                       seeds: Sequence[int] = (0,), prepend_bos: Optional[bool] = None,
                       batch_size: int = 64) -> AccuracyCurve:
    """ICL accuracy as the number of demonstrations grows (0 = zero-shot); same queries per seed."""
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, task)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in n_demos):
        raise ValueError(f"n_demos: got {list(n_demos)!r}; accepted: ints >= 0")
    rows = []
    for seed in seeds:
        ttask = resolve_task(model, task, seed, max(max(n_demos), 1), n_queries, "prompt_end", prepend_bos, True)
        bos = ttask.bos_tokens()
        queries = [ttask.query_tokens(i) for i in range(len(ttask.queries))]
        gold = torch.tensor([q.label[0] for q in ttask.queries])
        for n in n_demos:
            ctx = bos if n == 0 else ttask.prefix_tokens(n)
            cap = capture(model, ctx, queries, batch_size=batch_size)
            acc = float((predictions(cap, ttask.label_ids) == gold).float().mean())
            rows.append({"n_demos": n, "seed": seed, "accuracy": acc, "n_queries": len(queries)})
    return AccuracyCurve(rows, task_name(task))


__all__ = ["compare", "Comparison", "run_variant", "predictions", "icl_accuracy_curve", "AccuracyCurve",
           "active_config", "resolve_task", "default_prepend_bos", "task_name",
           "METHODS", "BASELINES", "LAYER_METRICS", "RUN_METRICS"]
