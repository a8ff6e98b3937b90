"""The plugin manager: built lazily, loads the ``tl_plugins`` entry-point group once.

Environment switches (read when the manager is first built; ``reset_plugin_manager()`` rereads):
    TL_PLUGINS_AUTOLOAD=0   load no entry points (built-in defaults only)
    TL_PLUGINS_LOAD=a,b     load only these entry points
    TL_PLUGINS_BLOCK=a,b    load every entry point except these
Built-in defaults (dense attention, the host's report section) are registered ``trylast`` like any
other plugin module.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Optional

import pluggy

from tl_plugins import hookspecs

ENTRY_POINT_GROUP = "tl_plugins"

_pm: Optional[pluggy.PluginManager] = None
_registry: Optional[dict[str, "PluginInfo"]] = None


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin declared through ``tl_plugins_register``."""

    name: str
    config: type
    summary: str = ""
    changes_forward: bool = False
    attention_seam: bool = False
    mlp_seam: bool = False
    backends: tuple[str, ...] = ("hooked",)
    source: str = ""
    version: str = ""
    #: The registered object (module or class) whose ``tl_plugins_register`` declared the name;
    #: enable and disable call this plugin's hooks alone (:func:`owner_hook`).
    owner: Any = field(default=None, repr=False, compare=False)


@dataclass
class EntryPointRecord:
    """One entry point of the group and what became of it."""

    name: str
    value: str
    dist: str
    version: str
    status: str  # "loaded", "blocked", "not selected", "failed: ..."
    plugin: Any = field(default=None, repr=False)


_entry_points: list[EntryPointRecord] = []


def _split_env(var: str) -> Optional[set[str]]:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    _entry_points.clear()
    autoload = os.environ.get("TL_PLUGINS_AUTOLOAD", "1").strip().lower() not in ("0", "false", "no")
    only = _split_env("TL_PLUGINS_LOAD")
    blocked = _split_env("TL_PLUGINS_BLOCK") or set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        rec = EntryPointRecord(
            name=ep.name,
            value=ep.value,
            dist=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
            status="loaded",
        )
        if ep.name in blocked:
            rec.status = "blocked (TL_PLUGINS_BLOCK)"
            pm.set_blocked(ep.name)
        elif not autoload:
            rec.status = "not loaded (TL_PLUGINS_AUTOLOAD=0)"
        elif only is not None and ep.name not in only:
            rec.status = "not loaded (not in TL_PLUGINS_LOAD)"
        else:
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the host
                rec.status = f"failed: {type(exc).__name__}: {exc}"
            else:
                if pm.get_plugin(ep.name) is None:
                    pm.register(module, name=ep.name)
                rec.plugin = module
        _entry_points.append(rec)


#: The host's built-in plugins, loaded by dotted name like any other plugin module.
DEFAULT_PLUGINS = (
    "tl_plugins.builtins.attention",
    "tl_plugins.builtins.models",
    "tl_plugins.builtins.model_card",
    "tl_plugins.builtins.load_bench",
)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("tl_plugins")
        pm.add_hookspecs(hookspecs)
        for dotted in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(dotted), name=dotted)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget the manager and registry; the next use rebuilds them (rereading the environment)."""
    global _pm, _registry
    _pm = None
    _registry = None


def entry_points() -> list[EntryPointRecord]:
    """Entry points of the ``tl_plugins`` group and their load status."""
    get_plugin_manager()
    return list(_entry_points)


def _source_of(pm: pluggy.PluginManager, impl_plugin: Any) -> tuple[str, str]:
    name = pm.get_name(impl_plugin) or getattr(impl_plugin, "__name__", "?")
    for rec in _entry_points:
        if rec.plugin is impl_plugin:
            return f"entry point {rec.name} ({rec.dist} {rec.version})", rec.version
    return f"registered module {name}", ""


def registry() -> dict[str, PluginInfo]:
    """Name -> PluginInfo for every plugin declared by a registered module (cached)."""
    global _registry
    pm = get_plugin_manager()
    if _registry is not None:
        return _registry
    found: dict[str, PluginInfo] = {}
    for impl in pm.hook.tl_plugins_register.get_hookimpls():
        source, version = _source_of(pm, impl.plugin)

        def register(
            name: str,
            *,
            config: type,
            summary: str = "",
            changes_forward: bool = False,
            attention_seam: bool = False,
            mlp_seam: bool = False,
            backends: tuple[str, ...] = ("hooked",),
            _source: str = source,
            _version: str = version,
            _owner: Any = impl.plugin,
        ) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"register: name must be a non-empty string, got {name!r}")
            if name in found:
                raise ValueError(
                    f"register: plugin name {name!r} is registered twice "
                    f"({found[name].source} and {_source})"
                )
            found[name] = PluginInfo(
                name=name,
                config=config,
                summary=summary,
                changes_forward=changes_forward,
                attention_seam=attention_seam,
                mlp_seam=mlp_seam,
                backends=tuple(backends),
                source=_source,
                version=_version,
                owner=_owner,
            )

        _call_isolated(pm, impl, "tl_plugins_register", register)
    _registry = found
    return found


def owner_hook(info: PluginInfo, hook_name: str) -> Callable[..., Any]:
    """The hook ``hook_name`` restricted to the plugin that registered ``info.name``: the host
    dispatches enable and disable to the owner, so no implementation has to check the name of a
    plugin it does not own (a module that registers several names still tells them apart)."""
    pm = get_plugin_manager()
    others = [p for p in pm.get_plugins() if p is not info.owner]
    return pm.subset_hook_caller(hook_name, remove_plugins=others)


def invalidate_registry() -> None:
    """Call after registering or unregistering a plugin module by hand."""
    global _registry
    _registry = None


def register_plugin(module: Any, name: Optional[str] = None) -> str:
    """Register a plugin module (or object with hookimpls) by hand; returns its name."""
    pm = get_plugin_manager()
    registered = pm.register(module, name=name)
    invalidate_registry()
    if registered is None:
        raise ValueError(f"register_plugin: {name or module!r} is blocked or already registered")
    return registered


def unregister_plugin(module: Any = None, name: Optional[str] = None) -> None:
    """Unregister a plugin module registered with ``register_plugin``."""
    get_plugin_manager().unregister(plugin=module, name=name)
    invalidate_registry()


def collect(hook_name: str) -> dict[str, tuple[Callable, str]]:
    """Run a ``register(name, obj, summary=...)`` style hook and return name -> (obj, summary)."""
    pm = get_plugin_manager()
    found: dict[str, tuple[Callable, str]] = {}

    def register(name: str, obj: Callable, summary: str = "") -> None:
        if name in found:
            raise ValueError(f"{hook_name}: {name!r} is registered twice")
        found[name] = (obj, summary)

    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        _call_isolated(pm, impl, hook_name, register)
    return found


# (plugin name, hook name, error text) for register-style hooks that raised: shown by `tl-plugins list`.
plugin_errors: list[tuple[str, str, str]] = []


def _call_isolated(pm: pluggy.PluginManager, impl: Any, hook_name: str, register: Callable) -> None:
    """Call one implementation of a register-style hook; a broken plugin must not break the host."""
    import warnings

    try:
        impl.function(register=register)
    except ValueError:
        raise  # duplicate names and bad declarations are the caller's business
    except Exception as exc:
        name = pm.get_name(impl.plugin) or "?"
        text = f"{type(exc).__name__}: {exc}"
        if (name, hook_name, text) not in plugin_errors:
            plugin_errors.append((name, hook_name, text))
            warnings.warn(f"tl_plugins: plugin {name!r} failed in {hook_name}: {text}", stacklevel=3)
