"""The user API: enable, disable, enabled, active, list_plugins."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from tl_plugins import backends as _backends
from tl_plugins.errors import NotEnabledError, PluginBlockedError, UnknownPluginError
from tl_plugins.plugins import PluginInfo, entry_points, owner_hook, registry
from tl_plugins.seams import SEAM_OWNER_ATTN, SEAM_OWNER_MLP, install_attention_seam, install_mlp_seam
from tl_plugins.state import check_not_busy_elsewhere, drop_state_if_empty, get_state, restore_owner


def _info(name: Any) -> PluginInfo:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a plugin name (str), got {type(name).__name__} {name!r}")
    reg = registry()
    if name in reg:
        return reg[name]
    for rec in entry_points():
        if rec.name == name and rec.status != "loaded":
            raise PluginBlockedError(
                f"name: plugin {name!r} is installed but {rec.status}; unset TL_PLUGINS_BLOCK / "
                "TL_PLUGINS_LOAD / TL_PLUGINS_AUTOLOAD (then tl_plugins.reset_plugin_manager()) to use it."
            )
    known = ", ".join(sorted(reg)) or "(none)"
    raise UnknownPluginError(f"name: unknown plugin {name!r}; known plugins: {known}")


def _make_config(info: PluginInfo, config: dict[str, Any]) -> Any:
    if dataclasses.is_dataclass(info.config):
        fields = {f.name for f in dataclasses.fields(info.config) if f.init}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TypeError(
                f"enable({info.name!r}): unknown option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(fields)) or '(none)'}"
            )
    return info.config(**config)


def _uninstall(model: Any, name: str, backend: Any) -> None:
    """Remove plugin ``name``: its disable hook, then everything the host recorded for it.

    The host's part runs even when the plugin's disable hook raises (a broken community plugin
    must not strand its seams, or other plugins, on the model); the hook's error is re-raised after.
    """
    error: BaseException | None = None
    try:
        info = registry().get(name)
        if info is not None:  # a plugin unregistered while enabled has no hook left to call
            owner_hook(info, "tl_plugins_disable")(model=model, name=name, backend=backend)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the cleanup
        error = exc
    finally:
        restore_owner(model, name)
        state = get_state(model)
        if state is not None:
            state.active.pop(name, None)
            state.attention_seam_users.discard(name)
            state.mlp_seam_users.discard(name)
            if not state.attention_seam_users:
                restore_owner(model, SEAM_OWNER_ATTN)
            if not state.mlp_seam_users:
                restore_owner(model, SEAM_OWNER_MLP)
            drop_state_if_empty(model)
    if error is not None:
        raise error


def enable(model: Any, name: str, **config: Any) -> Any:
    """Enable plugin ``name`` on ``model`` with keyword options; returns the config instance.

    Enabling a plugin that is already enabled reconfigures it: the old installation is removed
    first, and if the new config is refused the old one is put back. On any error the model is
    left exactly as it was.
    """
    info = _info(name)
    cfg = _make_config(info, config)
    backend = _backends.detect(model)
    check_not_busy_elsewhere(model, f"enable({name!r})")
    return _enable_instance(model, name, info, cfg, backend)


def _enable_instance(model: Any, name: str, info: PluginInfo, cfg: Any, backend: Any) -> Any:
    """Install the config instance ``cfg`` (reconfiguring if ``name`` is enabled; rolled back on error)."""
    state = get_state(model)
    previous = state.config(name) if state is not None else None
    if previous is not None:
        _uninstall(model, name, backend)
    try:
        _install(model, name, info, cfg, backend)
    except BaseException:
        if previous is not None:
            _install(model, name, info, previous, backend)
        raise
    return cfg


def _install(model: Any, name: str, info: PluginInfo, cfg: Any, backend: Any) -> None:
    state = get_state(model, create=True)
    try:
        if info.attention_seam:
            state.attention_seam_users.add(name)
            install_attention_seam(model, backend, name)
        if info.mlp_seam:
            state.mlp_seam_users.add(name)
            install_mlp_seam(model, backend)
        state.active[name] = cfg
        handled = owner_hook(info, "tl_plugins_enable")(model=model, name=name, config=cfg, backend=backend)
        if not handled and info.changes_forward and not (info.attention_seam or info.mlp_seam):
            raise RuntimeError(f"plugin {name!r} declared changes_forward but no enable hook handled it")
    except BaseException as exc:
        try:
            _uninstall(model, name, backend)
        except BaseException as cleanup:  # noqa: BLE001 - the enable error is the one to report
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"(disabling {name!r} after the failed enable also raised: {cleanup!r})")
        raise


def disable(model: Any, name: Optional[str] = None) -> None:
    """Disable plugin ``name`` on ``model`` (every enabled plugin when ``name`` is None).

    Removes every seam and attribute the plugin installed; outputs return bit-exactly to what they
    were before ``enable``. Raises ``NotEnabledError`` if ``name`` is not enabled on ``model``.
    """
    backend = _backends.detect(model)
    check_not_busy_elsewhere(model, "disable()" if name is None else f"disable({name!r})")
    state = get_state(model)
    if name is None:
        errors = []
        for n in list(reversed(state.active)) if state is not None else []:
            try:
                _uninstall(model, n, backend)
            except Exception as exc:  # every plugin comes off; the first error is raised after
                errors.append(exc)
        if errors:
            raise errors[0]
        return
    _info(name)
    if state is None or name not in state.active:
        on = ", ".join(active(model)) or "none"
        raise NotEnabledError(f"name: plugin {name!r} is not enabled on this model (enabled: {on})")
    _uninstall(model, name, backend)


@contextlib.contextmanager
def enabled(model: Any, name: str, **config: Any) -> Iterator[Any]:
    """Context manager: enable on entry, restore the previous state (disabled or old config) on exit."""
    state = get_state(model)
    previous = state.config(name) if state is not None else None
    cfg = enable(model, name, **config)
    try:
        yield cfg
    finally:
        if previous is not None:
            # Reinstall the previous instance itself: no second validation, any config type.
            _enable_instance(model, name, _info(name), previous, _backends.detect(model))
        else:
            disable(model, name)


def active(model: Any) -> dict[str, Any]:
    """Plugin name -> config instance for every plugin enabled on ``model``, in enable order."""
    state = get_state(model)
    return dict(state.active) if state is not None else {}


@dataclass(frozen=True)
class PluginListing:
    name: str
    summary: str
    changes_forward: bool
    source: str
    version: str


def list_plugins() -> list[PluginListing]:
    """Every registered plugin, sorted by name."""
    return [
        PluginListing(i.name, i.summary, i.changes_forward, i.source, i.version)
        for i in sorted(registry().values(), key=lambda i: i.name)
    ]
