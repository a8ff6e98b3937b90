"""Compiled CPU extensions that plugins build on first use (``torch.utils.cpp_extension``).

    from tl_plugins.extensions import CompiledExtension
    EXT = CompiledExtension("tl_topk_cpu", Path(__file__).with_name("cpp") / "topk_cpu.cpp")
    EXT.load()            # the module (built once, then cached); RuntimeError naming why it cannot be
    EXT.available()       # bool, never raises
    EXT.failure           # why it could not be built, or None

A build needs a C++ compiler, the Python headers and ``ninja`` (a dependency of the project, installed
beside the interpreter). Builds go to torch's extension cache (``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``) under a name that carries a tag of this CPU's instruction set: sources
are compiled with ``-march=native``, so a cache shared between machines (a cluster home directory)
keeps one build per CPU kind instead of handing one CPU's code to another. The first build takes
about half a minute; later processes load it in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_tag() -> str:
    """A short tag of this CPU's architecture and instruction-set flags (from ``/proc/cpuinfo``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


class CompiledExtension:
    """One C++ source built into a Python module on first use; the failure reason is kept.

    ``name``: the module's base name (the CPU tag is appended); ``source``: the ``.cpp`` file.
    """

    def __init__(self, name: str, source: Path) -> None:
        self.name = name
        self.source = Path(source)
        self.module: Any = None
        self.failure: Optional[str] = None
        self.warned = False  # the automatic-choice warning was given
        self._lock = threading.Lock()

    def _build(self) -> Any:
        from torch.utils.cpp_extension import load

        # The ninja that pip installs sits beside the interpreter, which need not be on PATH.
        here = os.path.dirname(sys.executable)
        if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
            os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
        return load(name=f"{self.name}_{cpu_tag()}", sources=[str(self.source)], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)

    def load(self) -> Any:
        """The compiled module (built on the first call, then cached per process); ``RuntimeError``
        saying why when it cannot be built (the reason is kept: later calls fail at once)."""
        with self._lock:
            if self.module is None and self.failure is None:
                try:
                    self.module = self._build()
                except Exception as exc:  # a missing compiler, headers or ninja: the reason is kept
                    text = str(exc).strip()
                    self.failure = f"{type(exc).__name__}: {text.splitlines()[-1] if text else exc}"
            if self.module is None:
                raise RuntimeError(f"{self.name}: the CPU extension could not be built ({self.failure})")
            return self.module

    def available(self) -> bool:
        """Whether the extension is built or builds now (the first call may take half a minute)."""
        try:
            self.load()
        except RuntimeError:
            return False
        return True

    def load_for(self, what: str, instead: str) -> Any:
        """``load()`` for an explicit request: ``RuntimeError`` "{what}: ... could not be built
        (reason); {instead}" (``instead`` names the alternative)."""
        try:
            return self.load()
        except RuntimeError:
            raise RuntimeError(f"{what}: the CPU extension could not be built ({self.failure}); {instead}") from None

    def available_or_warn(self, owner: str, fallback: str) -> bool:
        """``available()`` for an automatic choice: where it is not, one ``RuntimeWarning`` per process
        "{owner}: the CPU extension could not be built (reason); {fallback}"."""
        ok = self.available()
        if not ok and not self.warned:
            self.warned = True
            warnings.warn(f"{owner}: the CPU extension could not be built ({self.failure}); {fallback}",
                          RuntimeWarning, stacklevel=4)
        return ok

    def availability(self, ok: str) -> str:
        """One line for a listing: ``available (ok)`` or ``not available: reason``."""
        return f"available ({ok})" if self.available() else f"not available: {self.failure}"


__all__ = ["CompiledExtension", "cpu_tag"]
