"""Suite-wide settings, applied before any test module imports a plugin.

Without CUDA, Triton kernels run in Triton's CPU interpreter; ``TRITON_INTERPRET=1`` is read when a
``@triton.jit`` function is defined, so it must be set before *any* test (or plugin CLI, or backend
probe) imports a kernel module, not only in the Triton test file.

``@pytest.mark.hooked(reason="...")`` marks a test that checks HookedTransformer specifics (its
internals, or config features only HookedTransformerConfig has): it is skipped, with that reason,
on a transformer-lens without HookedTransformer (4.x). Guarantees that hold on any model are not
marked: they run on TransformerBridges there.
"""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import pytest

    marked = [item for item in items if item.get_closest_marker("hooked") is not None]
    if not marked:
        return
    from tl_plugins.models import tiny

    if tiny.hooked_available():
        return
    from importlib import metadata

    version = metadata.version("transformer-lens")
    for item in marked:
        mark = item.get_closest_marker("hooked")
        why = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "")
        item.add_marker(pytest.mark.skip(
            reason=f"needs HookedTransformer (transformer-lens {version} has none)" + (f": {why}" if why else "")))


def _torchrun(nproc, args, env=None, timeout=900):
    """``tl-plugins ARGS`` under ``torchrun --standalone --nproc-per-node NPROC`` (gloo on the CPU,
    one torch thread per rank, as torchrun sets it), through tests/dist_driver.py; a CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    driver = Path(__file__).with_name("dist_driver.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(driver), *[str(a) for a in args]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def torchrun():
    """Run ``tl-plugins ARGS`` as NPROC torchrun ranks: ``torchrun(2, ["embedspace", ...], env={...})``."""
    return _torchrun
