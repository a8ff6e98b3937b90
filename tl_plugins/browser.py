"""Headless Chromium for tests of what a person sees (the report, the debugger's web app).

Playwright drives the system's Chromium (the Debian package, ``/usr/bin/chromium``); Playwright's own
browser download is never used. ``unavailable_reason()`` says why a browser cannot start here (tests
skip with it); ``chromium()`` yields a ``playwright.sync_api.Browser``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def executable() -> Optional[str]:
    """Path of a Chromium binary: ``$TL_PLUGINS_CHROMIUM`` or the first of CANDIDATES on PATH."""
    env = os.environ.get("TL_PLUGINS_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def unavailable_reason() -> Optional[str]:
    """None when a headless browser can start, else why not (with the fix)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; make test installs it)"
    if executable() is None:
        return "no Chromium on PATH (apt-get install chromium; make test installs it where it can)"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    path = executable()
    if path is None:
        raise RuntimeError(unavailable_reason() or "no Chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


__all__ = ["chromium", "executable", "unavailable_reason"]
