"""The ``tl-plugins iclgd`` commands: ``tasks`` and ``compare`` (one task, or a grid of tasks x rates
x seeds, sharded under torchrun)."""

from __future__ import annotations

import click

from tl_iclgd.gd import DEFAULT_LR
from tl_plugins import cli_checks


@click.group("iclgd", context_settings={"help_option_names": ["-h", "--help"]})
def iclgd_group():
    """ICL vs gradient descent (Deutch et al. 2024): compare ZSL, ICL, GD and layer-causal GD."""


@iclgd_group.command("tasks")
def tasks_cmd():
    """List the built-in tasks."""
    from tl_iclgd.tasks import BUILTIN_TASKS

    for name, fn in BUILTIN_TASKS.items():
        t = fn()
        click.echo(f"{name:<16} {len(t.demos):>3} demos, {len(t.queries):>3} queries  {(fn.__doc__ or '').splitlines()[0]}")


@iclgd_group.command("compare")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, callback=cli_checks.model_name,
              help="Model name (tl-plugins models).")
@click.option("--task", "task_name", default="antonyms", show_default=True,
              help="Built-in task (tl-plugins iclgd tasks), or several comma-separated (a grid); copy_token: "
                   "a raw-id copy task for models without a tokenizer.")
@click.option("--lr", default=str(DEFAULT_LR), show_default=True,
              help="SGD learning rate, or several comma-separated (a grid).")
@click.option("--params", default="kv", show_default=True, help="Trained attention projections: letters of 'qkvo'.")
@click.option("--loss", type=click.Choice(["all_tokens", "label_only"]), default="all_tokens", show_default=True)
@click.option("--readout", type=click.Choice(["resid_post", "resid_mid"]), default="resid_post", show_default=True,
              help="Where LCGD reads each layer out.")
@click.option("--methods", default="gd,lcgd", show_default=True, help="Comma-separated: gd, lcgd.")
@click.option("--baselines", default="", help="Comma-separated: untrained, untrained_embeddings.")
@click.option("--n-demos", type=int, default=16, show_default=True)
@click.option("--n-queries", type=int, default=50, show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated ints.")
@click.option("--position", type=click.Choice(["prompt_end", "first_label_token"]), default="prompt_end",
              show_default=True)
@click.option("--context-budget", type=int, default=None, help="Tokens ICL may use (default: n_ctx).")
@click.option("--no-kendall", is_flag=True, help="Skip Kendall tau.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads; 1 is several times faster than 2 on a CPU shared with other work.")
@click.option("--per-layer", is_flag=True, help="Also print the per-layer table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the full result (settings, aggregate, per layer, runs) to this file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for a grid: one JSON per (task, lr) and summary.json (needed for several tasks or "
                   "rates).")
@click.option("--force", is_flag=True, help="Overwrite the --json file (or the --out folder's results) if there.")
@cli_checks.argument_errors_as_usage
def compare_cmd(model_name, task_name, lr, params, loss, readout, methods, baselines, n_demos, n_queries, seeds,
                position, context_budget, no_kendall, threads, per_layer, json_out, out_dir, force):
    """Run ZSL, ICL and fine-tuning on a task; print the table (mean ± std over seeds) and write JSON.

    Several tasks or rates make a grid (tasks x rates x seeds, written to --out). Under torchrun the
    grid's (task, lr, variant, seed) units are split by rank and checkpointed; see docs/scale.md."""
    import pandas as pd

    from tl_iclgd.capture import backend_of
    from tl_iclgd.compare import compare
    from tl_iclgd.gd import GDConfig
    from tl_plugins import distributed, models

    task_list = [t.strip() for t in task_name.split(",") if t.strip()]
    try:
        lr_list = [float(x) for x in lr.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"got {lr!r}; accepted: a number or comma-separated numbers",
                                 param_hint="--lr") from None
    grid = out_dir is not None or len(task_list) != 1 or len(lr_list) != 1 or distributed.from_env().distributed
    if grid and len(task_list) * len(lr_list) > 1 and out_dir is None:
        raise click.BadParameter("several tasks or rates make a grid; give --out FOLDER for its files",
                                 param_hint="--out")
    out_path = None if out_dir is None else cli_checks.output_dir(out_dir, "--out")
    if out_path is not None and (out_path / "summary.json").exists() and not force:
        raise click.BadParameter(f"{str(out_path)!r} holds a finished grid; pass --force to overwrite it",
                                 param_hint="--out")
    try:
        gd = GDConfig(lr=lr_list[0] if lr_list else float("nan"), params=params, loss=loss, readout=readout)
        for x in lr_list[1:]:
            GDConfig(lr=x)
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if threads < 1:
        raise click.BadParameter(f"got {threads}; accepted: an int >= 1", param_hint="--threads")
    json_file = cli_checks.output_file(json_out, "--json")
    if json_file is not None and json_file.exists() and not force:
        raise click.BadParameter(f"{str(json_file)!r} exists; pass --force to overwrite it", param_hint="--json")
    device = distributed.default_device(distributed.from_env())
    model = models.load(model_name, **({} if device == "cpu" else {"device": device}))
    if backend_of(model).tokenizer is None and any(t != "copy_token" for t in task_list):
        raise click.BadParameter(f"model {model_name!r} has no tokenizer, so built-in tasks cannot be tokenised; "
                                 "use --task copy_token or the Python API with a TokenizedTask", param_hint="--model")
    if grid:
        from tl_iclgd.grid import run_cli

        return run_cli(model, task_list, lr_list, gd, json_file=json_file, out_dir=out_path, per_layer=per_layer,
                       echo=click.echo, methods=[m.strip() for m in methods.split(",") if m.strip()],
                       baselines=[b.strip() for b in baselines.split(",") if b.strip()], n_demos=n_demos,
                       n_queries=n_queries, seeds=seed_list, position=position, context_budget=context_budget,
                       kendall=not no_kendall, num_threads=threads)
    from tl_iclgd.grid import cli_task

    res = compare(model, cli_task(task_list[0], model, n_demos, n_queries), gd, methods=[m.strip() for m in methods.split(",") if m.strip()],
                  baselines=[b.strip() for b in baselines.split(",") if b.strip()], n_demos=n_demos,
                  n_queries=n_queries, seeds=seed_list, position=position, context_budget=context_budget,
                  kendall=not no_kendall, progress=True, num_threads=threads)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        click.echo(res.table().to_string(index=False))
        if per_layer:
            click.echo(res.to_frame("layer").to_string(index=False))
    if json_file is not None:
        json_file.write_text(res.to_json())
        click.echo(f"written {json_file} ({res.settings['seconds']:.1f} s)")
