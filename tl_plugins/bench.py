"""Benchmarks: ``tl-plugins bench NAME``. Each prints ratios measured side by side in one run.

A plugin registers benchmarks through ``tl_plugins_register_benchmarks(register)`` with
``register(name, fn, summary=...)``; ``fn(*, quick=False, model=None, device="cpu") -> BenchResult``.
This module is the registry and the result; ``tl_plugins.measure`` measures medians and peak memory
the same way for every plugin.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch


def device_description(device: str = "cpu") -> str:
    """A human description of where a figure was measured (named with every figure)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


@dataclass
class BenchResult:
    """Rows of measurements (dicts with the same keys) plus notes and where they were taken."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = field(default_factory=device_description)
    checks: dict[str, bool] = field(default_factory=dict)
    #: Structured results beside the rows (tables a benchmark also returns, e.g. tl_iclgd's per-layer
    #: frames); written by ``to_json`` and so by ``tl-plugins bench NAME --json``.
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def check(self, name: str, passed: bool) -> None:
        """Record whether a target was met (printed as PASS/FAIL)."""
        self.checks[name] = bool(passed)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def render(self) -> str:
        lines = [f"== bench {self.name} ==", f"device: {self.device}"]
        if self.rows:
            import pandas as pd

            with pd.option_context("display.width", 200, "display.max_columns", 50,
                                   "display.float_format", "{:.4g}".format):
                lines.append(self.to_frame().to_string(index=False))
        for name, ok in self.checks.items():
            lines.append(f"[{'PASS' if ok else 'FAIL'}] {name}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<h4>bench {self.name}</h4><p>{self.device}</p>" + self.to_frame().to_html(index=False)


def available() -> dict[str, tuple[Callable[..., BenchResult], str]]:
    from tl_plugins.plugins import collect

    return collect("tl_plugins_register_benchmarks")


def run(name: str, *, quick: bool = False, model: Optional[str] = None, device: str = "cpu",
        found: Optional[dict] = None, backend: Optional[str] = None) -> BenchResult:
    """Run benchmark ``name``; ``found`` is ``available()`` when the caller already collected it.
    ``backend`` is passed to benchmarks whose function takes one (``ValueError`` for the others)."""
    import inspect

    found = available() if found is None else found
    if name not in found:
        raise KeyError(f"name: unknown benchmark {name!r}; available: {', '.join(sorted(found))}")
    fn, _ = found[name]
    kwargs: dict[str, Any] = {"quick": quick, "device": device}
    if model is not None:
        kwargs["model"] = model
    if backend is not None:
        if "backend" not in inspect.signature(fn).parameters:
            raise ValueError(f"backend: benchmark {name!r} does not take a backend (got {backend!r})")
        kwargs["backend"] = backend
    return fn(**kwargs)
