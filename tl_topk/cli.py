"""``tl-plugins topk ...``: perplexity vs k, pattern sparsity, and which backend runs here."""

from __future__ import annotations

import click

from tl_plugins.cli_checks import argument_errors_as_usage, model_name, output_file
from tl_topk.ops.backend import BACKENDS


def _parse_k(values):
    out = []
    for v in values:
        if v == "n":
            out.append("n")
            continue
        try:
            k = int(v)
        except ValueError:
            raise click.BadParameter(f"got {v!r}; accepted: integers >= 1 or 'n' (dense)",
                                     param_hint="--k") from None
        if k < 1:
            raise click.BadParameter(f"got {v!r}; accepted: integers >= 1 or 'n' (dense)", param_hint="--k")
        out.append(k)
    return out


@click.group("topk", context_settings={"help_option_names": ["-h", "--help"]})
def topk_group() -> None:
    """Top-k attention and top-k feed-forward (Gupta et al. 2021) on TransformerLens models."""


def _parse_layers(text):
    """'1-29' -> [1, ..., 29]; '0,3,5' -> [0, 3, 5]; None -> None (all layers)."""
    if text is None:
        return None
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"got {text!r}; accepted: a range like 1-29 or a list like 0,3,5",
                                 param_hint="--layers") from None


@topk_group.command("perplexity")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, callback=model_name,
              help="Model name (see `tl-plugins models`).")
@click.option("--k", "ks", multiple=True, default=("4", "8", "16", "32", "64", "128", "n"), show_default=True,
              help="k values (repeat the option); 'n' means dense.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["attention", "feed-forward", "both"]),
              default=("attention", "feed-forward", "both"), show_default=True,
              help="Where top-k applies (repeat the option).")
@click.option("--tokens", "n_tokens", default=1024, show_default=True, type=click.IntRange(min=2),
              help="Tokens of the stdlib Python docs text to score.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(list(BACKENDS)), help="Attention backend.")
@click.option("--ff-rule", default="value", show_default=True, type=click.Choice(["value", "magnitude"]),
              help="Feed-forward selection: largest pre-activations (paper) or largest |act(pre)|.")
@click.option("--layers", "layers_text", default=None,
              help="Only these layers get top-k: a range '1-29' or a list '0,3,5' (default: all).")
@click.option("--per-layer", is_flag=True,
              help="A grid: top-k on each layer (of --layers, default all) alone; the rows get a 'layers' column.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Also write a CSV.")
@argument_errors_as_usage
def perplexity_cmd(model_name, ks, modes, n_tokens, backend, ff_rule, layers_text, per_layer, csv_path) -> None:
    """Perplexity of MODEL on the Python docs text vs k (attention, feed-forward, both).

    Under torchrun the (mode, k, layers) cells are split by rank, checkpointed next to --csv; see
    docs/scale.md."""
    import pandas as pd

    import tl_plugins
    from tl_plugins import distributed
    from tl_topk.analysis import docs_tokens
    from tl_topk.grid import perplexity_grid

    layers = _parse_layers(layers_text)
    k_values = _parse_k(ks)
    csv_file = output_file(csv_path, "--csv")
    device = distributed.default_device(distributed.from_env())
    model = tl_plugins.models.load(model_name, **({} if device == "cpu" else {"device": device}))
    n_layers = tl_plugins.backends.detect(model).n_layers
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise click.BadParameter(f"layers {bad} do not exist; {model_name} has layers 0-{n_layers - 1}",
                                     param_hint="--layers")
    tokens = docs_tokens(model, n_tokens)
    layer_sets = [[x] for x in (layers if layers is not None else range(n_layers))] if per_layer else [layers]
    shard_dir = None if csv_file is None else csv_file.with_name(csv_file.name + ".shards")
    with distributed.session() as ctx:
        res = perplexity_grid(model, tokens, k_values, modes=modes, layer_sets=layer_sets, backend=backend,
                              ff_rule=ff_rule, shard_dir=shard_dir, progress=True, ctx=ctx,
                              settings={"model": model_name, "n_tokens": n_tokens})
    if not ctx.is_main:
        return
    dense, rows = res
    frame = pd.DataFrame(rows)
    click.echo(f"dense perplexity {dense:.4f} ({model_name}, {n_tokens} tokens"
               + (f", {ctx.world_size} processes)" if ctx.distributed else ")"))
    click.echo(frame.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if csv_file is not None:
        frame.to_csv(csv_file, index=False)


@topk_group.command("sparsity")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, callback=model_name)
@click.option("--k", "k", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--tokens", "n_tokens", default=256, show_default=True, type=click.IntRange(min=2))
@argument_errors_as_usage
def sparsity_cmd(model_name, k, n_tokens) -> None:
    """Per layer: non-zeros per pattern row under top-k, and the dense pattern's mass in its top k."""
    import tl_plugins
    from tl_topk.analysis import docs_tokens, pattern_sparsity

    model = tl_plugins.models.load(model_name)
    result = pattern_sparsity(model, docs_tokens(model, n_tokens), k, model_name=model_name)
    click.echo(result.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4f}"))


@topk_group.command("backends")
@argument_errors_as_usage
def backends_cmd() -> None:
    """Which backends can run here and what `auto` picks on CPU and CUDA."""
    import torch

    from tl_topk.ops import cpp_backend, flex, triton_backend
    from tl_topk.ops.backend import ENV_BACKEND, backend_from_env

    click.echo(f"{ENV_BACKEND}={backend_from_env() or '(unset)'}")
    click.echo("dense    available (oracle; used whenever hook_attn_scores/hook_pattern are hooked)")
    click.echo(f"cpp      {cpp_backend.availability()}")
    click.echo("chunked  available (linear memory in ATen calls, any device; auto on CPU where cpp is not built)")
    click.echo(f"triton   {triton_backend.availability()}")
    click.echo(f"flex     {flex.availability()}")
    click.echo(f"cuda     {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
