"""1 vs 2 torchrun processes on this machine, for the sharded commands (docs/scale.md's figures).

    .venv/bin/python scripts/scale_bench.py [--repeat 3] [--out scale.json]

Each command runs under ``torchrun --standalone --nproc-per-node N`` (one torch thread per rank, as
torchrun sets it) for N = 1 and 2, alternately, ``--repeat`` times; the figures are medians of wall
time (process start to exit, model load included) and of the work time the command reports, with the
load average before each run. It also records the units per command and the bytes each unit leaves
(result files, or shard lines from a run killed half-way, tests/dist_driver.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "dist_driver.py"

COMMANDS = {
    "embedspace sweep (SmolLM2, layer 0: 18 head circuits + 1 neuron layer)":
        ["embedspace", "sweep", "--model", "smollm2-135m", "--layers", "0", "-k", "20", "--k-neurons", "5",
         "--out", "{tmp}/sweep"],
    "topk perplexity (SmolLM2, 256 tokens, k 8/32, attention, layers 0-3 alone: 8 units)":
        ["topk", "perplexity", "--model", "smollm2-135m", "--tokens", "256", "--k", "8", "--k", "32", "--mode",
         "attention", "--per-layer", "--layers", "0-3", "--csv", "{tmp}/ppl.csv"],
    "debug index (SmolLM2, 30 feed-forward layers: 30 units)":
        ["debug", "--model", "smollm2-135m", "index"],
    "iclgd compare (SmolLM2, antonyms, 2 rates x 2 seeds, 4 demos, 8 queries: 4 units)":
        ["iclgd", "compare", "--model", "smollm2-135m", "--task", "antonyms", "--lr", "1e-3,1e-2", "--seeds",
         "0,1", "--n-demos", "4", "--n-queries", "8", "--no-kendall", "--out", "{tmp}/grid"],
}


def run(nproc, args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(DRIVER), *args]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return wall, load, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="substring of a command's label")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
               "commands": {}}
    import torch

    results["torch"] = torch.__version__
    for label, template in COMMANDS.items():
        if opts.only and opts.only not in label:
            continue
        times = {1: [], 2: []}
        loads = []
        for _ in range(opts.repeat):
            for nproc in (1, 2):
                tmp = Path(tempfile.mkdtemp(prefix="scale-"))
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
                args = [a.replace("{tmp}", str(tmp)) for a in template]
                if args[0] == "debug":  # the index goes under the cache: a fresh one per run, models linked
                    cache = tmp / "cache"
                    cache.mkdir()
                    from tl_plugins.models.cache import cache_dir

                    for entry in cache_dir().iterdir():
                        if entry.name != "debugger-index":
                            (cache / entry.name).symlink_to(entry)
                    env["TL_PLUGINS_CACHE"] = str(cache)
                wall, load, _ = run(nproc, args, env)
                times[nproc].append(wall)
                loads.append(load)
                shutil.rmtree(tmp, ignore_errors=True)
        m1, m2 = statistics.median(times[1]), statistics.median(times[2])
        results["commands"][label] = {"wall_s_1proc": times[1], "wall_s_2proc": times[2], "median_1proc": m1,
                                      "median_2proc": m2, "speedup": m1 / m2, "load_avg_1min": loads}
        print(f"{label}: median wall 1 process {m1:.1f} s, 2 processes {m2:.1f} s, ratio {m1 / m2:.2f}; "
              f"load average {min(loads):.2f}-{max(loads):.2f}", flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
