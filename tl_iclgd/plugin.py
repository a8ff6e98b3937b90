"""tl_plugins hooks for "iclgd": registration, and the commands (``cli.py``), the benchmark (``bench.py``)
and the report section (``report.py``) handed to the host.

"iclgd" observes and never changes the forward pass (``changes_forward=False``). Enabling it only
stores default fine-tuning settings: ``tl_plugins.enable(model, "iclgd", lr=1e-3)`` makes
``tl_iclgd.compare(model, task)`` use ``GDConfig(lr=1e-3)`` when no ``gd=`` is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tl_plugins import hookimpl

if TYPE_CHECKING:
    import click

    from tl_plugins.backends.base import Backend
    from tl_plugins.hookspecs import RegisterBenchmark, RegisterPlugin
    from tl_plugins.report import Report


@hookimpl
def tl_plugins_register(register: RegisterPlugin) -> None:
    from tl_iclgd.gd import GDConfig

    register("iclgd", config=GDConfig, changes_forward=False,
             summary="ICL vs gradient descent on cached activations: vanilla GD, layer-causal GD, metrics, baselines")


@hookimpl
def tl_plugins_enable(model: Any, name: str, config: Any, backend: Backend) -> bool:
    return True  # nothing to install: the config is kept by the host (tl_plugins.active)


@hookimpl
def tl_plugins_register_commands(cli: click.Group) -> None:
    from tl_iclgd.cli import iclgd_group

    cli.add_command(iclgd_group)


@hookimpl
def tl_plugins_register_benchmarks(register: RegisterBenchmark) -> None:
    from tl_iclgd.bench import bench_iclgd

    register("iclgd", bench_iclgd, summary="ICL vs GD: full comparison on SmolLM2 (time, peak memory, tables)")


@hookimpl
def tl_plugins_report_sections(report: Report) -> None:
    from tl_iclgd.report import report_section

    report_section(report)
