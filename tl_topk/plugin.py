"""The ``topk`` plugin's hookimpls: registration, enable checks, the attention and MLP seams,
the ``tl-plugins topk`` commands, the ``topk`` benchmark and the report section."""

from __future__ import annotations

from tl_plugins import hookimpl
from tl_topk import integration
from tl_topk.config import TopKConfig


@hookimpl
def tl_plugins_register(register):
    register(
        "topk",
        config=TopKConfig,
        summary="top-k attention (Gupta et al. 2021) and top-k feed-forward, drop-in",
        changes_forward=True,
        attention_seam=True,
        mlp_seam=True,
    )


@hookimpl
def tl_plugins_enable(model, name, config, backend):
    if name != "topk":
        return None
    integration.check_model(model, config)
    return True


@hookimpl
def tl_plugins_attention(call):
    return integration.attention(call)


@hookimpl
def tl_plugins_mlp_activation(call):
    return integration.mlp_activation(call)


@hookimpl
def tl_plugins_register_commands(cli):
    from tl_topk.cli import topk_group

    cli.add_command(topk_group)


@hookimpl
def tl_plugins_register_benchmarks(register):
    from tl_topk.bench import bench_topk

    register("topk", bench_topk, summary="top-k attention: perplexity vs k, memory vs n, CPU time")


@hookimpl
def tl_plugins_report_sections(report):
    from tl_topk.report import report_section

    report_section(report)
