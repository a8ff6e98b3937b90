"""The ``embedspace`` and ``steer`` plugins' hookimpls: registration, the ``tl-plugins embedspace`` commands, the
``embedspace`` benchmark and the report section. Enabling it only records a config (bases, ln,
chunk budget) on the model; the forward pass is never changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, Optional

from tl_embedspace.config import EmbedSpaceConfig
from tl_plugins import hookimpl

if TYPE_CHECKING:
    import click
    import torch
    from jaxtyping import Float

    from tl_plugins.backends.base import Backend
    from tl_plugins.hookspecs import RegisterBenchmark, RegisterPlugin
    from tl_plugins.report import Report
    from tl_plugins.seams import MLPActivationCall


@hookimpl
def tl_plugins_register(register: RegisterPlugin) -> None:
    register(
        "embedspace",
        config=EmbedSpaceConfig,
        summary="every weight in vocabulary space (Dar et al. 2023), exact top-k over vocab x vocab",
        changes_forward=False,
    )
    from tl_embedspace.debugger.steer import SteerConfig

    register(
        "steer",
        config=SteerConfig,
        summary="LM-Debugger interventions: set/scale/add FFN coefficients, add residual vectors",
        changes_forward=True,
        mlp_seam=True,
    )


@hookimpl
def tl_plugins_enable(model: Any, name: str, config: Any, backend: Backend) -> bool:
    # the host calls this module's hook only for the names it registered: "embedspace" and "steer"
    if name == "steer":
        from tl_embedspace.debugger import steer

        steer.install(model, config, backend)
    return True  # embedspace: nothing to install; the config is read by tl_embedspace.config.space_for


@hookimpl
def tl_plugins_disable(model: Any, name: str, backend: Backend) -> bool:
    if name != "steer":
        return True  # embedspace installed nothing
    import tl_plugins
    from tl_embedspace.debugger import steer

    steer.uninstall(tl_plugins.active(model).get("steer"))
    return True


@hookimpl(wrapper=True)
def tl_plugins_mlp_activation(
    call: MLPActivationCall,
) -> Generator[None, Optional[Float[torch.Tensor, "batch pos d_mlp"]], Optional[Float[torch.Tensor, "batch pos d_mlp"]]]:
    out = yield
    if call.config("steer") is None:
        return out
    from tl_embedspace.debugger import steer

    return steer.mlp_activation_wrapper(call, out)


@hookimpl
def tl_plugins_register_commands(cli: click.Group) -> None:
    from tl_embedspace.cli import embedspace_group

    cli.add_command(embedspace_group)
    from tl_embedspace.debugger.cli import debug_group

    cli.add_command(debug_group)


@hookimpl
def tl_plugins_register_benchmarks(register: RegisterBenchmark) -> None:
    from tl_embedspace.bench import bench_embedspace

    register("embedspace", bench_embedspace,
             summary="exact top-k pairs of a head, find_neurons, sweep time, speed-up over materialising")
    from tl_embedspace.debugger.bench import bench_debugger

    register("debugger", bench_debugger,
             summary="LM-Debugger: trace vs run_with_cache, value index build, token search, web round trip")


@hookimpl
def tl_plugins_report_sections(report: Report) -> None:
    from tl_embedspace.report import report_section

    report_section(report)
    from tl_embedspace.debugger.report import report_section as debugger_section

    debugger_section(report)
