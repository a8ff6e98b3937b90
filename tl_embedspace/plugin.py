"""The ``embedspace`` plugin's hookimpls: registration, the ``tl-plugins embedspace`` commands, the
``embedspace`` benchmark and the report section. Enabling it only records a config (bases, ln,
chunk budget) on the model; the forward pass is never changed."""

from __future__ import annotations

from tl_embedspace.config import EmbedSpaceConfig
from tl_plugins import hookimpl


@hookimpl
def tl_plugins_register(register):
    register(
        "embedspace",
        config=EmbedSpaceConfig,
        summary="every weight in vocabulary space (Dar et al. 2023), exact top-k over vocab x vocab",
        changes_forward=False,
    )


@hookimpl
def tl_plugins_enable(model, name, config, backend):
    if name != "embedspace":
        return None
    return True  # nothing to install: the config is read by tl_embedspace.config.space_for


@hookimpl
def tl_plugins_register_commands(cli):
    from tl_embedspace.cli import embedspace_group

    cli.add_command(embedspace_group)


@hookimpl
def tl_plugins_register_benchmarks(register):
    from tl_embedspace.bench import bench_embedspace

    register("embedspace", bench_embedspace,
             summary="exact top-k pairs of a head, find_neurons, sweep time, speed-up over materialising")


@hookimpl
def tl_plugins_report_sections(report):
    from tl_embedspace.report import report_section

    report_section(report)
