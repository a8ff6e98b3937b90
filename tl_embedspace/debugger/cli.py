"""``tl-plugins debug``: the web app (``tl-plugins debug --model NAME``), the value index
(``debug index``), a trace in the terminal (``debug trace``) and the method paper's checks
(``debug repro promotion|saturation|coherence|intervention|all``)."""

from __future__ import annotations

import json
import sys

import click


def _load(name: str):
    import tl_plugins

    return tl_plugins.models.load(name)


@click.group("debug", invoke_without_command=True)
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="a tl_plugins model name")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (localhost by default)")
@click.option("--port", default=8765, show_default=True, type=int, help="port (0: any free port)")
@click.option("--no-index", is_flag=True, help="do not load or build the value index at start")
@click.pass_context
def debug_group(ctx, model_name, host, port, no_index):
    """LM-Debugger: trace, search and steer feed-forward sub-updates in a local web app."""
    ctx.obj = {"model": model_name}
    if ctx.invoked_subcommand is not None:
        return
    from tl_embedspace.debugger.app import DebuggerState, PortInUseError, Server, bind, make_app

    try:
        sock = bind(host, port)
    except PortInUseError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"loading {model_name} ...", err=True)
    model = _load(model_name)
    state = DebuggerState(model, model_name, index=None if no_index else "build")
    server = Server(make_app(state), sock)
    click.echo(f"LM-Debugger for {model_name}: {server.url}  (Ctrl-C stops it)")
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass


@debug_group.command("index")
@click.option("--heads", is_flag=True, help="also index every row of W_O")
@click.option("--n-tokens", default=30, show_default=True)
@click.option("--rebuild", is_flag=True, help="build even if a valid index exists")
@click.pass_obj
def index_cmd(obj, heads, n_tokens, rebuild):
    """Build (or verify) the value index of the model under the user's cache.

    Under torchrun the layers' blocks are split by rank, rank 0 merges; see docs/scale.md."""
    import tl_plugins
    from tl_embedspace.debugger.index import ValueIndex
    from tl_plugins import distributed

    with distributed.session() as ctx:
        device = distributed.default_device(ctx)
        model = tl_plugins.models.load(obj["model"], **({} if device == "cpu" else {"device": device}))
        if rebuild or (ctx.distributed and not ValueIndex.path_for(model, n_tokens=n_tokens, heads=heads)[0].exists()):
            idx = ValueIndex.build(model, n_tokens=n_tokens, heads=heads, ctx=ctx)
        else:
            idx = ValueIndex.load(model, n_tokens=n_tokens, heads=heads)
    if ctx.is_main:
        click.echo(repr(idx) + (f" ({ctx.world_size} processes)" if ctx.distributed else ""))


@debug_group.command("trace")
@click.argument("prompt")
@click.option("--target", default=None)
@click.option("--contrast", default=None)
@click.option("--position", default=-1, show_default=True)
@click.option("-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def trace_cmd(obj, prompt, target, contrast, position, k, as_json):
    """Trace PROMPT: per layer the logit lens and the dominant sub-updates."""
    from tl_embedspace.debugger.trace import trace

    r = trace(_load(obj["model"]), prompt, position=position, target=target, contrast=contrast, k=k)
    if as_json:
        click.echo(json.dumps(r.to_dict(), default=str))
        return
    cols = ["layer", "post_top", "post_rank", "post_prob", "topk_direct_share"]
    click.echo(r.targets.to_string(index=False))
    click.echo(r.layers[cols].to_string(index=False))
    click.echo(r.sub_updates[["layer", "label", "coefficient", "score", "direct_effect", "top_tokens"]]
               .to_string(index=False))


@debug_group.command("repro")
@click.argument("which", type=click.Choice(["promotion", "saturation", "coherence", "intervention", "all"]))
@click.option("--quick", is_flag=True, help="fewer prompts (a smoke run)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def repro_cmd(obj, which, quick, as_json):
    """The method paper's checks on the model (docs/debugger.md)."""
    from tl_embedspace.debugger import repro

    model = _load(obj["model"])
    names = ["promotion", "saturation", "coherence", "intervention"] if which == "all" else [which]
    for name in names:
        res = getattr(repro, name)(model, quick=quick)
        click.echo(json.dumps(res, default=str, indent=1) if as_json else repro.render(name, res))
