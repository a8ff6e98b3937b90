"""Where fetched and converted models live: ``$TL_PLUGINS_CACHE`` or ``$XDG_CACHE_HOME/tl_plugins``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("TL_PLUGINS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tl_plugins"
