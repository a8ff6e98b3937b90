"""``tl-plugins embedspace ...``: top-tokens, pairs, sweep, find-neurons from the command line."""

from __future__ import annotations

import json as _json

import click

from tl_plugins.cli_checks import argument_errors_as_usage, model_name, output_dir


def _space_options(f):
    f = click.option("--filter", "filter_", default="auto", show_default=True,
                     help="Token filter: corpus (whole words of the standard library's docs), ascii, alnum, "
                          "alpha, words, or none (every token). auto: corpus when the model has a "
                          "tokenizer, else none.")(f)
    f = click.option("--ln", default="raw", show_default=True, type=click.Choice(["raw", "as_loaded"]),
                     help="Layer-norm handling (raw warns on processed weights).")(f)
    f = click.option("--write-basis", default="auto", show_default=True,
                     type=click.Choice(["auto", "paper", "unembed", "full-circuit", "pinv"]))(f)
    f = click.option("--read-basis", default="auto", show_default=True,
                     type=click.Choice(["auto", "paper", "unembed", "full-circuit", "pinv"]))(f)
    f = click.option("--model", "model_name", default="smollm2-135m", show_default=True, callback=model_name,
                     help="Model name (see `tl-plugins models`).")(f)
    return argument_errors_as_usage(f)


def _space(model_name, read_basis, write_basis, ln, filter_, device="cpu"):
    from tl_plugins import models

    model = models.load(model_name, **({} if device == "cpu" else {"device": device}))
    kw = dict(read_basis=read_basis, write_basis=write_basis, ln=ln)
    from tl_embedspace.space import resolve_filter, space_with_filter

    return space_with_filter(model, resolve_filter(filter_, model), auto=filter_ == "auto", **kw)


def _token(s: str):
    return int(s) if s.lstrip("-").isdigit() else s


def _emit(result, as_json: bool) -> None:
    df = result.to_frame()
    if as_json:
        click.echo(_json.dumps({"label": getattr(result, "label", ""), "basis": getattr(result, "basis", {}),
                                "rows": df.to_dict(orient="records")}, ensure_ascii=False, default=str))
    else:
        click.echo(str(result))


@click.group("embedspace", context_settings={"help_option_names": ["-h", "--help"]})
def embedspace_group() -> None:
    """Weights in vocabulary space (Dar et al. 2023): tokens of vectors, exact top pairs, sweeps."""


@embedspace_group.command("top-tokens")
@_space_options
@click.option("--layer", type=click.IntRange(min=0), default=None, help="Layer (for neurons and heads).")
@click.option("--neuron", type=click.IntRange(min=0), default=None, help="Feed-forward neuron.")
@click.option("--head", type=click.IntRange(min=0), default=None, help="Attention head.")
@click.option("--kind", default=None,
              type=click.Choice(["value", "key", "gate", "Q", "K", "V", "O", "embedding", "unembedding"]),
              help="What to project: a neuron's value/key/gate (default value), a head's Q/K/V column or "
                   "O row (needs --index), or a token's embedding/unembedding (needs --token).")
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True, help="Column/row of a head matrix.")
@click.option("--token", default=None, help="Token id or string (embedding/unembedding).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def top_tokens(model_name, read_basis, write_basis, ln, filter_, layer, neuron, head, kind, index, token, k,
               as_json):
    """Top and bottom tokens of one parameter vector."""
    sp = _space(model_name, read_basis, write_basis, ln, filter_)
    if kind in ("embedding", "unembedding"):
        if token is None:
            raise click.BadParameter("needs --token", param_hint="--kind")
        res = getattr(sp, kind)(_token(token), k)
    elif neuron is not None:
        if layer is None:
            raise click.BadParameter("needs --layer with --neuron", param_hint="--layer")
        if kind not in (None, "value", "key", "gate"):
            raise click.BadParameter(f"{kind!r} is not a neuron vector; use value, key or gate",
                                     param_hint="--kind")
        res = {"value": sp.ff_value, "key": sp.ff_key, "gate": sp.ff_gate, None: sp.ff_value}[kind](layer, neuron, k)
    elif head is not None:
        if layer is None or kind not in ("Q", "K", "V", "O"):
            raise click.BadParameter("needs --layer and --kind Q|K|V|O with --head", param_hint="--head")
        res = sp.head_vector(layer, head, kind, index, k)
    else:
        raise click.UsageError("say what to project: --layer/--neuron, --layer/--head/--kind, or --kind/--token")
    _emit(res, as_json)


@embedspace_group.command("pairs")
@_space_options
@click.option("--layer", type=click.IntRange(min=0), required=True)
@click.option("--head", type=click.IntRange(min=0), required=True)
@click.option("--circuit", type=click.Choice(["ov", "qk"]), default="ov", show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--mode", type=click.Choice(["largest", "smallest", "abs"]), default="largest", show_default=True)
@click.option("--exclude-diagonal", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def pairs(model_name, read_basis, write_basis, ln, filter_, layer, head, circuit, k, mode, exclude_diagonal,
          as_json):
    """Exact top-k token pairs of a head's OV or QK circuit (never materialised)."""
    sp = _space(model_name, read_basis, write_basis, ln, filter_)
    mat = sp.ov(layer, head) if circuit == "ov" else sp.qk(layer, head)
    res = mat.topk_pairs(k, mode, exclude_diagonal=exclude_diagonal)
    _emit(res, as_json)
    if not as_json:
        click.echo(f"copying score {mat.copying_score():.4f}; computed {res.stats.fraction_computed:.2%} of the "
                   f"{mat.shape[0]} x {mat.shape[1]} matrix")


@embedspace_group.command("find-neurons")
@_space_options
@click.option("--token", required=True, help="Token id or string (visible spaces allowed).")
@click.option("--kind", type=click.Choice(["value", "key", "gate"]), default="value", show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def find_neurons(model_name, read_basis, write_basis, ln, filter_, token, kind, k, as_json):
    """Neurons of every layer ranked by their score for a token (one matrix product)."""
    sp = _space(model_name, read_basis, write_basis, ln, filter_)
    _emit(sp.find_neurons(_token(token), k, kind=kind), as_json)


@embedspace_group.command("sweep")
@_space_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["parquet", "json"]), default="parquet", show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=50, show_default=True, help="Pairs per head circuit.")
@click.option("--k-neurons", type=click.IntRange(min=1), default=10, show_default=True, help="Value tokens per neuron.")
@click.option("--layers", default=None, help="Comma-separated layers (default: all).")
@click.option("--no-heads", is_flag=True)
@click.option("--no-neurons", is_flag=True)
def sweep_cmd(model_name, read_basis, write_basis, ln, filter_, out_dir, fmt, k, k_neurons, layers, no_heads,
              no_neurons):
    """Rank every head's OV and QK and every feed-forward value into files; rerun to resume.

    Under torchrun (--nproc-per-node N, --nnodes M) the items are split by rank; see docs/scale.md."""
    from tl_embedspace.sweep import sweep
    from tl_plugins import distributed

    try:
        lay = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise click.BadParameter(f"got {layers!r}; accepted: comma-separated layer numbers like 0,3,5",
                                 param_hint="--layers") from None
    out = output_dir(out_dir, "--out")
    with distributed.session() as ctx:
        sp = _space(model_name, read_basis, write_basis, ln, filter_, device=distributed.default_device(ctx))
        summary = sweep(sp, out, k=k, k_neurons=k_neurons, fmt=fmt, layers=lay, heads=not no_heads,
                        neurons=not no_neurons, ctx=ctx)
    if ctx.is_main:
        click.echo(f"{summary['written']} written, {summary['skipped_existing']} already there, "
                   f"{summary['seconds']:.1f} s on {ctx.world_size} process(es) -> {out_dir}")
