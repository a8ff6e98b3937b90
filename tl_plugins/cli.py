"""The ``tl-plugins`` command line. Plugins add subcommands via ``tl_plugins_register_commands(cli)``."""

from __future__ import annotations

import sys
import time

import click

from tl_plugins.cli_checks import model_name, output_dir, output_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tl-plugins")
def cli() -> None:
    """TransformerLens plugins: top-k attention, embedding-space projections, ICL vs GD."""


@cli.command("list")
def list_cmd() -> None:
    """List plugins, where they came from, and entry points that are blocked or failed."""
    import tl_plugins
    from tl_plugins.plugins import entry_points

    plugins = tl_plugins.list_plugins()
    click.echo(f"{'plugin':<12} {'version':<9} summary")
    for p in plugins:
        click.echo(f"{p.name:<12} {p.version or '-':<9} {p.summary}")
        click.echo(f"{'':<12} {'':<9} from {p.source}")
    click.echo("\nentry points (group 'tl_plugins'):")
    for rec in entry_points():
        click.echo(f"  {rec.name:<12} {rec.value:<28} {rec.dist} {rec.version}: {rec.status}")
    from tl_plugins.plugins import collect, plugin_errors

    for hook in ("tl_plugins_register_models", "tl_plugins_register_benchmarks"):
        collect(hook)
    if plugin_errors:
        click.echo("\nerrors raised by plugins (the rest of the host keeps working):")
        for name, hook, text in plugin_errors:
            click.echo(f"  {name}: {hook}: {text}")


@cli.command("models")
def models_cmd() -> None:
    """List the model names that ``--model`` and ``tl_plugins.models.load`` accept."""
    from tl_plugins import models

    for name, summary in sorted(models.available().items()):
        click.echo(f"{name:<16} {summary}")


@cli.command("bench")
@click.argument("name", required=False)
@click.option("--quick", is_flag=True, help="Smaller sizes (seconds, not minutes).")
@click.option("--model", default=None, callback=model_name, help="Model name (default: the benchmark's own).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this file.")
@click.option("--backend", type=click.Choice(["hooked", "bridge"]), default=None,
              help="Model backend, for benchmarks that measure both (topk).")
def bench_cmd(name, quick, model, device, json_out, backend) -> None:
    """Run benchmark NAME (omit it to list them); prints ratios measured in one run."""
    from tl_plugins import bench

    found = bench.available()
    if name is None:
        for n, (_, summary) in sorted(found.items()):
            click.echo(f"{n:<12} {summary}")
        return
    if name not in found:
        raise click.BadParameter(f"unknown benchmark {name!r}; available: {', '.join(sorted(found))}",
                                 param_hint="NAME")
    json_file = output_file(json_out, "--json")
    try:
        result = bench.run(name, quick=quick, model=model, device=device, found=found, backend=backend)
    except ValueError as exc:
        if str(exc).startswith("backend:"):
            raise click.BadParameter(str(exc), param_hint="--backend") from None
        raise
    click.echo(result.render())
    if json_file is not None:
        json_file.write_text(result.to_json())


def _model_names(ctx, param, value):
    names = tuple(model_name(ctx, param, v) for v in value) or ("smollm2-135m",)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise click.BadParameter(f"model {dup[0]!r} given twice; give each model once")
    return names


@cli.command("report")
@click.option("--model", "model_names", multiple=True, callback=_model_names,
              help="Model name (see `tl-plugins models`); repeat it to compare models side by side "
                   "on one page.  [default: smollm2-135m]")
@click.option("--out", "out_dir", default="report", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Smaller measurements: for tests and slow machines.")
@click.option("--backend", type=click.Choice(["auto", "hooked", "bridge"]), default="auto", show_default=True,
              help="HookedTransformer or TransformerBridge (auto: hooked where transformer-lens has it).")
def report_cmd(model_names, out_dir, quick, backend) -> None:
    """Write a self-contained HTML report (OUT/index.html, tables as OUT/data/*.csv; opens offline).

    One --model: a page about that model. Several: one page, one column per model, each model
    loaded in turn (and released before the next)."""
    from tl_plugins import models
    from tl_plugins.report import build_report

    out_dir = output_dir(out_dir, "--out")
    t0 = time.perf_counter()

    def loader(name):
        def load():
            click.echo(f"loading {name} ...", err=True)
            return models.load(name, backend=backend)
        return load

    path = build_report([(n, loader(n)) for n in model_names], out_dir=out_dir, options={"quick": quick})
    click.echo(f"report written to {path.resolve()} ({time.perf_counter() - t0:.0f} s)")


def build_cli() -> click.Group:
    """The root group with every plugin's subcommands added."""
    from tl_plugins.plugins import get_plugin_manager

    get_plugin_manager().hook.tl_plugins_register_commands(cli=cli)
    return cli


def main(argv=None) -> None:
    build_cli()(args=argv, prog_name="tl-plugins")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
