"""The hookimpls of the ``topk`` plugin and of the ``sdpa`` plugin (exact dense attention through
``scaled_dot_product_attention``): registration, enable checks, the attention and MLP seams, the
``tl-plugins topk`` commands, the ``topk`` benchmark and the report section.

Both plugins answer through one ``tl_plugins_attention`` implementation: top-k first, then, for the
calls that top-k leaves dense (or every call when only ``sdpa`` is enabled), SDPA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from tl_plugins import hookimpl
from tl_topk import seam_handlers
from tl_topk.config import SDPAConfig, TopKConfig

if TYPE_CHECKING:
    import click
    import torch
    from jaxtyping import Float

    from tl_plugins.backends.base import Backend
    from tl_plugins.hookspecs import RegisterBenchmark, RegisterPlugin
    from tl_plugins.report import Report
    from tl_plugins.seams import AttentionCall, MLPActivationCall


@hookimpl
def tl_plugins_register(register: RegisterPlugin) -> None:
    register(
        "topk",
        config=TopKConfig,
        summary="top-k attention (Gupta et al. 2021) and top-k feed-forward, drop-in",
        changes_forward=True,
        attention_seam=True,
        mlp_seam=True,
    )
    register(
        "sdpa",
        config=SDPAConfig,
        summary="exact dense attention through scaled_dot_product_attention (fused, linear memory) "
                "while hook_attn_scores / hook_pattern are not observed",
        changes_forward=True,
        attention_seam=True,
    )


@hookimpl
def tl_plugins_enable(model: Any, name: str, config: Any, backend: Backend) -> bool:
    # the host calls this module's hook only for the names it registered: "topk" and "sdpa"
    if name == "sdpa":
        config.check_model(model.cfg.n_layers)
    else:
        seam_handlers.check_model(model, config)
    return True


@hookimpl
def tl_plugins_attention(
    call: AttentionCall,
) -> Optional[Float[torch.Tensor, "batch query_pos head_index d_head"]]:
    z = seam_handlers.attention(call)
    return seam_handlers.sdpa_attention(call) if z is None else z


@hookimpl
def tl_plugins_mlp_activation(call: MLPActivationCall) -> Optional[Float[torch.Tensor, "batch pos d_mlp"]]:
    return seam_handlers.mlp_activation(call)


@hookimpl
def tl_plugins_register_commands(cli: click.Group) -> None:
    from tl_topk.cli import topk_group

    cli.add_command(topk_group)


@hookimpl
def tl_plugins_register_benchmarks(register: RegisterBenchmark) -> None:
    from tl_topk.bench import bench_topk

    register("topk", bench_topk, summary="top-k attention: perplexity vs k, memory vs n, CPU time")


@hookimpl
def tl_plugins_report_sections(report: Report) -> None:
    from tl_topk.report import report_section

    report_section(report)
