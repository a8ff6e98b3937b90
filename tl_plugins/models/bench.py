"""``tl-plugins bench load``: time and peak memory of ``models.load``, cold (conversion) and warm."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from tl_plugins.bench import BenchResult

# The process's own resident-set high-water mark (tl_plugins.measure.process_peak_rss_bytes): each load
# runs in a fresh process, so that is the load's peak, imports included.
_SNIPPET = (
    "import time,json;t=time.perf_counter();"
    "import tl_plugins;m=tl_plugins.models.load({name!r});s=time.perf_counter()-t;"
    "from tl_plugins.measure import process_peak_rss_bytes;"
    "print(json.dumps({{'s':s,'rss':process_peak_rss_bytes()}}))"
)


def _timed_load(name: str, env: dict) -> tuple[float, int]:
    import json

    out = subprocess.run([sys.executable, "-c", _SNIPPET.format(name=name)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    d = json.loads(out)
    return d["s"], d["rss"]


def bench_load(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu") -> BenchResult:
    """Cold = empty cache except the downloaded GGUF (conversion included); warm = cache filled.

    Each load runs in a fresh Python process, so import time is included and peak RSS is the
    process's own maximum.
    """
    from tl_plugins.models import smollm2
    from tl_plugins.models.cache import cache_dir

    res = BenchResult("load")
    env = dict(os.environ)
    if model == "smollm2-135m" and not quick:
        gguf = smollm2.fetch_gguf(smollm2.model_dir())
        with tempfile.TemporaryDirectory() as tmp:
            env_cold = {**env, "TL_PLUGINS_CACHE": tmp}
            os.makedirs(os.path.join(tmp, "smollm2-135m"))
            shutil.copy(gguf, os.path.join(tmp, "smollm2-135m", gguf.name))
            s, rss = _timed_load(model, env_cold)
            res.add(model=model, cache="cold (convert GGUF)", seconds=round(s, 2), peak_rss_gb=round(rss / 2**30, 2))
    if model == "smollm2-135m":
        smollm2.ensure_hf_folder()
    times = []
    for _ in range(1 if quick else 3):
        s, rss = _timed_load(model, env)
        times.append(s)
    res.add(model=model, cache="warm (median)", seconds=round(statistics.median(times), 2),
            peak_rss_gb=round(rss / 2**30, 2))
    res.notes.append(f"cache: {cache_dir()}; each load in a fresh process (imports included)")
    return res
