"""Built-in plugin: the report's model card (config, parameter counts, active plugins, load time,
weight processing), the first section of every ``tl-plugins report``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tl_plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from tl_plugins.report import Report


@hookimpl(trylast=True)
def tl_plugins_report_sections(report: Report) -> None:
    model_card_section(report)


def model_card_section(report: Report) -> None:
    """The host's own section: config, parameter counts, active plugins, load time, processing."""
    from importlib import metadata

    import pandas as pd

    import tl_plugins

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
    attn_types = getattr(cfg, "attn_types", None)
    local = "" if not attn_types else (
        f" {list(attn_types).count('local')} of its {cfg.n_layers} layers attend locally (window "
        f"{getattr(cfg, 'window_size', '?')}), the rest globally.")
    summary = (f"{report.model_name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads "
               f"over {view.n_kv_heads} key/value head(s) of size {cfg.d_head}, vocabulary {cfg.d_vocab:,}; "
               f"{n_params / 1e6:.1f}M parameters, loaded in {report.options.get('load_seconds', float('nan')):.1f} s "
               f"as a {type(model).__name__} ({view.processing.describe()}).{local}")
    report.metric("parameters (M)", round(n_params / 1e6, 1))
    report.metric("vocabulary", cfg.d_vocab)
    report.metric("load time (s)", round(float(report.options.get("load_seconds", float("nan"))), 1))
    report.add_section(
        "Model card",
        tables=[pd.DataFrame(rows, columns=["field", "value"]), plugins],
        table_titles=["model", "plugins"], order=0, summary=summary, max_rows=40,
    )
