"""The plugin contract: every hook a tl_plugins plugin may implement.

Each docstring is the contract. A plugin implements any subset with ``@tl_plugins.hookimpl``
and is found through the ``tl_plugins`` entry-point group (or registered by hand with
``tl_plugins.get_plugin_manager().register(module)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import pluggy

if TYPE_CHECKING:
    import click
    import torch
    from jaxtyping import Float

    from tl_plugins.backends.base import Backend
    from tl_plugins.bench import BenchResult
    from tl_plugins.report import Report
    from tl_plugins.seams import AttentionCall, MLPActivationCall

hookspec = pluggy.HookspecMarker("tl_plugins")
hookimpl = pluggy.HookimplMarker("tl_plugins")


class RegisterPlugin(Protocol):
    """The ``register`` callable ``tl_plugins_register`` receives."""

    def __call__(self, name: str, *, config: type, summary: str = ..., changes_forward: bool = ...,
                 attention_seam: bool = ..., mlp_seam: bool = ..., backends: tuple[str, ...] = ...) -> None: ...


class BenchmarkFunction(Protocol):
    """A benchmark: keyword options (a benchmark may accept more, e.g. ``backend``) -> a ``BenchResult``."""

    def __call__(self, *, quick: bool = ..., model: str = ..., device: str = ...) -> BenchResult: ...


class RegisterBenchmark(Protocol):
    """The ``register`` callable ``tl_plugins_register_benchmarks`` receives."""

    def __call__(self, name: str, fn: BenchmarkFunction, summary: str = ...) -> None: ...


class RegisterModel(Protocol):
    """The ``register`` callable ``tl_plugins_register_models`` receives; ``loader(**options) -> model``."""

    def __call__(self, name: str, loader: Callable[..., Any], summary: str = ...) -> None: ...


@hookspec
def tl_plugins_register(register: RegisterPlugin) -> None:
    """Declare the plugins this module provides.

    Call ``register(name, *, config=ConfigDataclass, summary="one line", changes_forward=bool,
    attention_seam=bool, mlp_seam=bool, backends=("hooked",))`` once per plugin. ``config`` is a
    dataclass whose fields are the keyword arguments accepted by ``tl_plugins.enable(model, name,
    **fields)``; its ``__post_init__`` must validate them and raise ``ValueError``/``TypeError`` naming
    the argument, the value and what is accepted. ``changes_forward`` says whether enabling alters the
    model's forward pass (the host then promises that disabling restores the outputs bit-exactly).
    ``attention_seam`` / ``mlp_seam`` ask the host to install the attention seam
    (``tl_plugins_attention``) / the MLP activation seam (``tl_plugins_mlp_activation``) while the
    plugin is enabled. A name may be registered only once.
    """


@hookspec(firstresult=True)
def tl_plugins_enable(model: Any, name: str, config: Any, backend: Backend) -> Optional[object]:
    """Install plugin ``name`` on ``model`` with the validated ``config`` instance.

    The host calls this hook of the plugin that registered ``name`` alone (the registry knows which
    module declared each name), so an implementation sees only its own names; return a truthy value
    once installed. ``backend`` is the model's backend object (see
    ``tl_plugins.backends``). An implementation must change behaviour only at method seams on the
    instance (``tl_plugins.seams``): never replace a module, never leave a permanent hook on a hook
    point. It may raise to refuse the model (unsupported attention type, ...); the host then rolls
    back anything the implementation installed through ``tl_plugins.seams`` and leaves the model as
    it was. Enabling an already enabled plugin calls this hook again with the new config
    (reconfigure) after the old installation was removed.
    """


@hookspec(firstresult=True)
def tl_plugins_disable(model: Any, name: str, backend: Backend) -> Optional[object]:
    """Undo ``tl_plugins_enable`` for ``name``; called on the plugin that registered ``name`` alone.

    Overrides installed through ``tl_plugins.seams`` are removed by the host after this hook, so most
    plugins need not implement it; implement it to drop caches or other per-model state.
    """


@hookspec(firstresult=True)
def tl_plugins_attention(
    call: AttentionCall,
) -> Optional[Float[torch.Tensor, "batch query_pos head_index d_head"]]:
    """Compute the attention mix ``z`` for one attention module call, or return None to pass.

    ``call`` is a ``tl_plugins.seams.AttentionCall`` carrying post-rotary ``q`` [batch, query_pos,
    head_index, d_head] and ``k``/``v`` [batch, key_pos, kv_head_index, d_head] (grouped-query K/V are
    *not* expanded), the masks, the scale and soft-cap, the layer index, the per-model configs of the
    enabled plugins (``call.config(name)``) and helpers: ``call.dense_scores()`` (scaled, soft-capped, masked scores
    exactly as TransformerLens computes them), ``call.hook_attn_scores(x)`` / ``call.hook_pattern(x)``
    (fire the module's hook points), ``call.dense_z(pattern)``.

    Return ``z`` [batch, query_pos, head_index, d_head] *before* ``hook_z``; the seam fires ``hook_z``,
    the output projection and ``hook_result``. The first non-None result wins; the host's built-in
    implementation (``trylast``) reproduces TransformerLens's dense attention bit-exactly. Plugins
    that only modify inputs or outputs (scale queries, ablate a head) implement this hook as a
    ``wrapper=True`` hookimpl: edit ``call`` before ``yield`` and transform the returned ``z`` after it.
    """


@hookspec(firstresult=True)
def tl_plugins_mlp_activation(call: MLPActivationCall) -> Optional[Float[torch.Tensor, "batch pos d_mlp"]]:
    """Compute the MLP's post-activation hidden units for one MLP call, or return None to pass.

    ``call`` is a ``tl_plugins.seams.MLPActivationCall`` carrying ``pre`` [batch, pos, d_mlp] (the
    value ``hook_pre`` produced: for gated MLPs the gate pre-activation), the original ``act_fn``,
    the layer index and the enabled configs. Return ``act_fn(pre)`` or a modified version of it.
    Installed only while a plugin that declared ``mlp_seam=True`` in ``register`` is enabled.
    """


@hookspec
def tl_plugins_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``tl-plugins`` command line. ``cli`` is the root ``click.Group``."""


@hookspec
def tl_plugins_register_benchmarks(register: RegisterBenchmark) -> None:
    """Declare benchmarks for ``tl-plugins bench NAME``.

    Call ``register(name, function, summary="...")``; ``function(**options) -> BenchResult`` runs the
    benchmark and returns a result whose rows are ratios measured side by side in one run.
    """


@hookspec
def tl_plugins_report_sections(report: Report) -> None:
    """Contribute sections to ``tl-plugins report``.

    ``report`` is a ``tl_plugins.report.Report`` with ``report.model``, ``report.model_name``,
    ``report.options`` and ``report.add_section(title, html=..., figures=[plotly figures],
    tables=[pandas DataFrames], order=int)``. Implementations must be quick on a 2-core CPU
    (a few minutes at most on SmolLM2-135M) and show progress with ``report.progress(...)``.
    """


@hookspec
def tl_plugins_register_models(register: RegisterModel) -> None:
    """Add named models to ``tl_plugins.models.load``.

    Call ``register(name, loader, summary="...")`` with ``loader(**options) -> model``.
    """
