"""``tl-plugins ARGS`` as one torchrun rank, with the faults the distributed tests need.

TL_TEST_KILL="RANK:N": that rank SIGKILLs itself right after its N-th unit is checkpointed (a real
crash, so the rerun takes the path a crash leaves). TL_TEST_ARGS_RANK<r>: a JSON list of arguments
that rank r runs instead of ARGS (ranks started with other settings).
"""

import json
import os
import signal
import sys

# run as a script, this folder comes first on sys.path, and tests/tl_plugins would shadow the package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from tl_plugins import distributed  # noqa: E402

rank = int(os.environ.get("RANK", "0"))
kill = os.environ.get("TL_TEST_KILL")
if kill:
    kill_rank, after = (int(x) for x in kill.split(":"))
    seen = []

    def unit_done(name, key, ctx):
        seen.append(key)
        if ctx.rank == kill_rank and len(seen) >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    distributed.unit_done = unit_done
args = sys.argv[1:]
if os.environ.get(f"TL_TEST_ARGS_RANK{rank}"):
    args = json.loads(os.environ[f"TL_TEST_ARGS_RANK{rank}"])

from tl_plugins.cli import main  # noqa: E402

main(args)
