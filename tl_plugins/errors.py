"""Exceptions raised by the host. Each names the argument, the value and what would be accepted."""

from __future__ import annotations


class TLPluginsError(Exception):
    """Base class of every error the host raises on purpose."""


class UnknownPluginError(TLPluginsError, KeyError):
    """A plugin name that no registered plugin owns."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownModelError(TLPluginsError, KeyError):
    """A model name that the zoo does not know."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginBlockedError(TLPluginsError):
    """A plugin that TL_PLUGINS_BLOCK / TL_PLUGINS_LOAD excluded."""


class NotEnabledError(TLPluginsError):
    """Disabling a plugin that is not enabled on this model."""


class UnsupportedModelError(TLPluginsError, TypeError):
    """A model the host or a plugin cannot work with."""


class ModelFetchError(TLPluginsError, RuntimeError):
    """A model file could not be fetched, read or converted."""
