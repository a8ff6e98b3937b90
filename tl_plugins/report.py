"""``tl-plugins report``: one self-contained HTML page about one model, or several side by side.

Every plugin contributes sections through ``tl_plugins_report_sections(report)``. A section opens
with a ``summary`` (two to four sentences its plugin computes from its own numbers), then plotly
figures and pandas tables. Long tables are capped on the page (``max_rows``) and every table is
written in full as CSV under ``data/`` beside ``index.html``, linked from the page. Plotly figures are
embedded with plotly.js inlined once, so ``index.html`` opens offline with no CDN.

With several models (``build_report([(name, model_or_loader), ...], out)``) the page has one row per
section and one column per model, and a first table "at a glance" with the figures each section
registered with ``report.metric(name, value)``. Loaders are called one at a time and each model is
released before the next loads, so two real models never sit in memory together.
"""

from __future__ import annotations

import gc
import html
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from tqdm.auto import tqdm

MAX_ROWS = 15


@dataclass
class Section:
    title: str
    html: str = ""
    figures: list[Any] = field(default_factory=list)
    tables: list[Any] = field(default_factory=list)
    order: int = 100
    plugin: str = ""
    seconds: float = 0.0
    summary: str = ""
    table_titles: list[str] = field(default_factory=list)
    max_rows: int = MAX_ROWS


class Report:
    """What a report-section hook receives; ``add_section`` collects its contribution."""

    def __init__(self, model: Any, model_name: str, *, options: Optional[dict] = None,
                 progress: bool = True):
        self.model = model
        self.model_name = model_name
        self.options = dict(options or {})
        self.sections: list[Section] = []
        self.metrics: dict[str, Any] = {}
        self._progress = progress
        self._current_plugin = ""

    @property
    def quick(self) -> bool:
        """True when the caller asked for a fast, smaller report (tests, CI)."""
        return bool(self.options.get("quick", False))

    def add_section(self, title: str, *, html: str = "", figures: Iterable[Any] = (),
                    tables: Iterable[Any] = (), order: int = 100, summary: str = "",
                    table_titles: Sequence[str] = (), max_rows: int = MAX_ROWS) -> Section:
        """Add a section: a summary (plain sentences; HTML-escaped), free HTML, plotly figures and
        pandas DataFrames, shown in that order. Tables longer than ``max_rows`` show their first
        rows; the full table is always downloadable as CSV."""
        s = Section(title, html, list(figures), list(tables), order, self._current_plugin,
                    summary=summary, table_titles=list(table_titles), max_rows=max_rows)
        self.sections.append(s)
        return s

    def metric(self, name: str, value: Any) -> None:
        """One figure to remember, shown in the side-by-side table of a multi-model report."""
        self.metrics[name] = value

    def progress(self, iterable: Iterable[Any], desc: str = "", total: Optional[int] = None):
        """Wrap ``iterable`` in a progress bar (disabled when the report runs quietly)."""
        return tqdm(iterable, desc=desc, total=total, disable=not self._progress, leave=False,
                    file=sys.stderr)


def fmt(x: Any, digits: int = 3) -> str:
    """A number as a person reads it in a sentence (3 significant digits, thousands separated)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x != x:
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}h3{margin:.6em 0 .2em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.meta{color:#666;font-size:13px}.error{color:#a00;white-space:pre-wrap;font-family:monospace}
.summary{background:#f6f8fa;border-left:4px solid #4a78b5;padding:.5em .9em;margin:.6em 0}
.cols{display:grid;gap:1.5em;align-items:start}.col{min-width:0}
.tablecap{font-size:12px;color:#555}.tablecap a{margin-left:.5em}
nav a{margin-right:1em}
"""


def _slug(title: str, i: int) -> str:
    return f"s{i}-" + "".join(c.lower() if c.isalnum() else "-" for c in title)[:40]


def _file_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "x"


def _section_key(title: str, model_name: str) -> str:
    """Sections with the same title but for the model's own name line up across models."""
    return title.replace(model_name, "{model}")


class _Writer:
    """Renders tables (capped, CSV beside the page) and figures (plotly.js included once)."""

    def __init__(self, out_dir: Optional[Path]):
        self.out_dir = out_dir
        self.plotly_included = False
        self.n_figures = 0
        self.csv_files: list[str] = []

    def figure(self, fig: Any) -> str:
        import plotly.io as pio

        self.n_figures += 1
        fig.update_layout(autosize=True)
        out = pio.to_html(fig, full_html=False, include_plotlyjs=not self.plotly_included,
                          config={"responsive": True, "displaylogo": False},
                          default_width="100%")
        self.plotly_included = True
        return f"<div class='tlp-figure'>{out}</div>"

    def table(self, df: Any, title: str, stem: str, max_rows: int) -> str:
        link = ""
        if self.out_dir is not None:
            name = f"data/{stem}.csv"
            i = 2
            while name in self.csv_files:
                name, i = f"data/{stem}-{i}.csv", i + 1
            (self.out_dir / "data").mkdir(parents=True, exist_ok=True)
            df.to_csv(self.out_dir / name, index=False)
            self.csv_files.append(name)
            link = f"<a href='{html.escape(name)}' download>CSV ({len(df):,} rows)</a>"
        shown = df.head(max_rows)
        cap = (f"{html.escape(title)}: " if title else "") + (
            f"first {len(shown)} of {len(df):,} rows" if len(df) > max_rows else f"{len(df):,} rows")
        body = shown.to_html(index=False, border=0, float_format=lambda x: f"{x:.4g}")
        return f"<div class='tlp-table'><div class='tablecap'>{cap}{link}</div>{body}</div>"


def _render_section_body(s: Section, w: _Writer, stem: str) -> str:
    parts = []
    if s.summary:
        parts.append(f"<p class='summary'>{html.escape(s.summary)}</p>")
    parts.append(f"<p class='meta'>from {html.escape(s.plugin or '?')}, {s.seconds:.1f} s</p>")
    if s.html:
        parts.append(s.html)
    for fig in s.figures:
        parts.append(w.figure(fig))
    for j, table in enumerate(s.tables):
        title = s.table_titles[j] if j < len(s.table_titles) else ""
        parts.append(w.table(table, title, f"{stem}-{_file_slug(title or str(j + 1))}", s.max_rows))
    return "\n".join(parts)


def render(report: Union[Report, Sequence[Report]], out_dir: Optional[Path] = None) -> str:
    """The report(s) as one HTML string with plotly.js inlined once; with ``out_dir`` every table is
    also written there as CSV (``data/*.csv``) and linked."""
    reports = [report] if isinstance(report, Report) else list(report)
    names = [r.model_name for r in reports]
    w = _Writer(out_dir)
    # rows: section keys in order (first seen), columns: models
    keyed: dict[str, dict[int, Section]] = {}
    orders: dict[str, tuple] = {}
    for m, r in enumerate(reports):
        for n, s in enumerate(sorted(r.sections, key=lambda s: s.order)):
            key = _section_key(s.title, r.model_name)
            keyed.setdefault(key, {})[m] = s
            orders.setdefault(key, (s.order, m, n))
    keys = sorted(keyed, key=lambda k: orders[k])
    title = " vs ".join(names)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>tl-plugins report: {html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tl-plugins report: {html.escape(title)}</h1>",
        f"<p class='meta'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p><nav>",
    ]
    parts += [f"<a href='#{_slug(k, i)}'>{html.escape(k.replace('{model}', 'model'))}</a>"
              for i, k in enumerate(keys)]
    parts.append("</nav>")
    if len(reports) > 1:
        import pandas as pd

        metric_names = list(dict.fromkeys(n for r in reports for n in r.metrics))
        glance = pd.DataFrame({"figure": metric_names,
                               **{r.model_name: [r.metrics.get(n, "") for n in metric_names] for r in reports}})
        parts.append("<h2 id='at-a-glance'>At a glance</h2>")
        parts.append("<p class='summary'>" + html.escape(
            f"{len(reports)} models side by side: {', '.join(names)}. Each row below is one section, one "
            "column per model; the table collects the one figure each section asks you to remember.") + "</p>")
        parts.append(w.table(glance, "figures to remember", "at-a-glance", 100))
    cols = f"grid-template-columns:repeat({len(reports)},minmax(0,1fr))"
    for i, key in enumerate(keys):
        per = keyed[key]
        first = per[min(per)]
        heading = first.title if len(reports) == 1 else key.replace("{model}", "model")
        parts.append(f"<h2 id='{_slug(key, i)}'>{html.escape(heading)}</h2>")
        if len(reports) == 1:
            parts.append(_render_section_body(first, w, f"{_file_slug(names[0])}-{_file_slug(key)}"))
            continue
        parts.append(f"<div class='cols' style='{cols}'>")
        for m, r in enumerate(reports):
            parts.append(f"<div class='col'><h3>{html.escape(r.model_name)}</h3>")
            own = per.get(m)
            parts.append(_render_section_body(own, w, f"{_file_slug(r.model_name)}-{_file_slug(key)}")
                         if own is not None else "<p class='meta'>no such section for this model</p>")
            parts.append("</div>")
        parts.append("</div>")
    parts.append(f"<meta name='tlp-figures' content='{w.n_figures}'>")
    parts.append(f"<meta name='tlp-csv' content='{len(w.csv_files)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def collect(model: Any, model_name: str, *, options: Optional[dict] = None, progress: bool = True) -> Report:
    """Ask every plugin for its sections on one model.

    A section that raises is replaced by an error section naming the plugin, so one broken plugin
    does not lose the rest of the report.
    """
    from tl_plugins.plugins import get_plugin_manager

    report = Report(model, model_name, options=options, progress=progress)
    pm = get_plugin_manager()
    impls = pm.hook.tl_plugins_report_sections.get_hookimpls()[::-1]  # pluggy calls LIFO
    for impl in tqdm(impls, desc=f"report sections ({model_name})", disable=not progress, file=sys.stderr):
        name = pm.get_name(impl.plugin) or "?"
        report._current_plugin = name
        before = len(report.sections)
        t0 = time.perf_counter()
        try:
            impl.function(report=report)
        except Exception as exc:
            report.add_section(
                f"{name}: section failed",
                html=f"<div class='error'>{html.escape(''.join(traceback.format_exception(exc)))}</div>",
                order=999,
            )
        elapsed = time.perf_counter() - t0
        for s in report.sections[before:]:
            s.seconds = elapsed / max(1, len(report.sections) - before)
    report.model = None  # the page needs the numbers, not the model
    return report


ModelOrLoader = Union[Any, Callable[[], Any]]


def build_report(model: Union[ModelOrLoader, Sequence[tuple[str, ModelOrLoader]]], model_name: Optional[str] = None,
                 out_dir: str | Path = "report", *, options: Optional[dict] = None,
                 progress: bool = True) -> Path:
    """Write ``out_dir/index.html`` (and ``out_dir/data/*.csv``); return the page's path.

    ``build_report(model, "name", out)`` reports on one model. ``build_report([("a", model_or_loader),
    ("b", ...)], out_dir=out)`` puts several side by side; a loader (a function of no arguments
    returning the model) is called when its turn comes and its model released after its sections.
    ``options["load_seconds"]`` may be a dict ``name -> seconds`` for several models.
    """
    if isinstance(model, (list, tuple)):
        entries = list(model)
    else:
        if model_name is None:
            raise TypeError("model_name: required when one model is given")
        entries = [(model_name, model)]
    if not entries:
        raise ValueError("model: got no models; accepted: a model, or a list of (name, model or loader)")
    options = dict(options or {})
    load_seconds = options.get("load_seconds")
    reports = []
    for name, m in entries:
        opts = dict(options)
        if callable(m) and not hasattr(m, "cfg"):
            t0 = time.perf_counter()
            m = m()
            opts["load_seconds"] = time.perf_counter() - t0
        elif isinstance(load_seconds, dict):
            opts["load_seconds"] = load_seconds.get(name, float("nan"))
        reports.append(collect(m, name, options=opts, progress=progress))
        del m
        gc.collect()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render(reports, out), encoding="utf-8")
    return path
