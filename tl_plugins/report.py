"""``tl-plugins report``: one self-contained HTML page about one model, built from plugin sections.

Every plugin contributes sections through ``tl_plugins_report_sections(report)``. Plotly figures
are embedded with plotly.js inlined once, so ``index.html`` opens offline with no CDN.
"""

from __future__ import annotations

import html
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm


@dataclass
class Section:
    title: str
    html: str = ""
    figures: list[Any] = field(default_factory=list)
    tables: list[Any] = field(default_factory=list)
    order: int = 100
    plugin: str = ""
    seconds: float = 0.0


class Report:
    """What a report-section hook receives; ``add_section`` collects its contribution."""

    def __init__(self, model: Any, model_name: str, *, options: Optional[dict] = None,
                 progress: bool = True):
        self.model = model
        self.model_name = model_name
        self.options = dict(options or {})
        self.sections: list[Section] = []
        self._progress = progress
        self._current_plugin = ""

    @property
    def quick(self) -> bool:
        """True when the caller asked for a fast, smaller report (tests, CI)."""
        return bool(self.options.get("quick", False))

    def add_section(self, title: str, *, html: str = "", figures: Iterable[Any] = (),
                    tables: Iterable[Any] = (), order: int = 100) -> Section:
        """Add a section: free HTML, plotly figures and pandas DataFrames, shown in that order."""
        s = Section(title, html, list(figures), list(tables), order, self._current_plugin)
        self.sections.append(s)
        return s

    def progress(self, iterable: Iterable[Any], desc: str = "", total: Optional[int] = None):
        """Wrap ``iterable`` in a progress bar (disabled when the report runs quietly)."""
        return tqdm(iterable, desc=desc, total=total, disable=not self._progress, leave=False,
                    file=sys.stderr)


def model_card_section(report: Report) -> None:
    """The host's own section: config, parameter counts, active plugins, load time, processing."""
    import pandas as pd

    import tl_plugins

    from importlib import metadata

    model, cfg = report.model, report.model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    view = tl_plugins.weights(model)
    rows = [
        ("model", report.model_name),
        ("backend", f"{view.backend.name}: {type(model).__name__}, transformer-lens "
                    f"{metadata.version('transformer-lens')}"),
        ("architecture", getattr(cfg, "original_architecture", None)),
        ("n_layers", cfg.n_layers), ("d_model", cfg.d_model), ("n_heads", cfg.n_heads),
        ("n_key_value_heads", view.n_kv_heads), ("d_head", cfg.d_head), ("d_mlp", cfg.d_mlp),
        ("d_vocab", cfg.d_vocab), ("n_ctx", cfg.n_ctx), ("act_fn", cfg.act_fn),
        ("normalization", cfg.normalization_type), ("positional", cfg.positional_embedding_type),
        ("parameters", f"{n_params:,}" + (
            f" ({n_params - model.W_U.numel():,} with the tied W_U counted once)" if view.tied else "")),
        ("dtype", str(cfg.dtype)),
        ("weight processing", view.processing.describe()),
        ("tied embeddings", view.tied),
        ("load time (s)", f"{report.options.get('load_seconds', float('nan')):.2f}"),
        ("plugins active on the model", ", ".join(tl_plugins.active(model)) or "none"),
    ]
    plugins = pd.DataFrame(
        [(p.name, p.summary, p.source) for p in tl_plugins.list_plugins()],
        columns=["plugin", "summary", "source"],
    )
    report.add_section(
        "Model card",
        tables=[pd.DataFrame(rows, columns=["field", "value"]), plugins],
        order=0,
    )


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
.meta{color:#666;font-size:13px}.error{color:#a00;white-space:pre-wrap;font-family:monospace}
nav a{margin-right:1em}
"""


def _slug(title: str, i: int) -> str:
    return f"s{i}-" + "".join(c.lower() if c.isalnum() else "-" for c in title)[:40]


def render(report: Report) -> str:
    """The report as one HTML string with plotly.js inlined once."""
    import plotly.io as pio

    sections = sorted(report.sections, key=lambda s: s.order)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>tl-plugins report: {html.escape(report.model_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tl-plugins report: {html.escape(report.model_name)}</h1>",
        f"<p class='meta'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p><nav>",
    ]
    parts += [f"<a href='#{_slug(s.title, i)}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)]
    parts.append("</nav>")
    plotly_included = False
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='{_slug(s.title, i)}'>{html.escape(s.title)}</h2>")
        parts.append(f"<p class='meta'>from {html.escape(s.plugin or '?')}, {s.seconds:.1f} s</p>")
        if s.html:
            parts.append(s.html)
        for fig in s.figures:
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=not plotly_included))
            plotly_included = True
        for table in s.tables:
            parts.append(table.to_html(index=False, border=0, float_format=lambda x: f"{x:.4g}"))
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(model: Any, model_name: str, out_dir: str | Path, *, options: Optional[dict] = None,
                 progress: bool = True) -> Path:
    """Ask every plugin for its sections and write ``out_dir/index.html``; return its path.

    A section that raises is replaced by an error section naming the plugin, so one broken plugin
    does not lose the rest of the report.
    """
    from tl_plugins.plugins import get_plugin_manager

    report = Report(model, model_name, options=options, progress=progress)
    pm = get_plugin_manager()
    impls = pm.hook.tl_plugins_report_sections.get_hookimpls()[::-1]  # pluggy calls LIFO
    for impl in tqdm(impls, desc="report sections", disable=not progress, file=sys.stderr):
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render(report), encoding="utf-8")
    return path
