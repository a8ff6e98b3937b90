"""Small validators for the ``tl-plugins`` command line, shared by every plugin's subcommands.

A bad argument is a usage error (exit code 2, one line naming the option), found before any model is
loaded where it can be: model names are checked against the zoo, output paths are checked before
the computation that fills them. Library errors that name an argument ("layer: got 99; accepted:
...", the project's one format) become usage errors too; anything else stays a traceback, because
it is a bug.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import click

_ARG_MESSAGE = re.compile(r"^[A-Za-z_][\w\-\[\]'\". ,()]*: ")


def model_name(ctx: Any, param: Any, value: Optional[str]) -> Optional[str]:
    """click callback: ``value`` must be a name in the model zoo."""
    if value is None:
        return value
    from tl_plugins import models

    known = models.available()
    if value not in known:
        raise click.BadParameter(f"unknown model {value!r}; available: {', '.join(sorted(known))}")
    return value


def output_file(path: Optional[str], hint: str) -> Optional[Path]:
    """The file ``path`` (``~`` expanded) if it can be written, else a usage error naming ``hint``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise click.BadParameter(f"{str(p)!r} is a folder; give a file name", param_hint=hint)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise click.BadParameter(f"folder {str(parent)!r} does not exist", param_hint=hint)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise click.BadParameter(f"{str(p)!r} cannot be written", param_hint=hint)
    return p


def output_dir(path: str, hint: str) -> Path:
    """The folder ``path`` (``~`` expanded; created later by the command) if it can be made or used."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise click.BadParameter(f"{str(p)!r} exists and is not a folder", param_hint=hint)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise click.BadParameter(f"{str(p)!r} cannot be created or written (no write access to "
                                 f"{str(probe)!r})", param_hint=hint)
    return p


def argument_errors_as_usage(fn: Callable) -> Callable:
    """Decorator: a ``ValueError``/``IndexError``/``TypeError``/``TLPluginsError`` whose message names an
    argument ("arg: got ...") becomes a one-line usage error (exit code 2)."""
    from tl_plugins.errors import TLPluginsError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, IndexError, TypeError, TLPluginsError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if isinstance(exc, TLPluginsError) or _ARG_MESSAGE.match(message):
                raise click.UsageError(message) from None
            raise

    return wrapper


__all__ = ["model_name", "output_file", "output_dir", "argument_errors_as_usage"]
