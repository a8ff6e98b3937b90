"""Sharded work under ``torchrun``: one command, from one CPU process to many GPUs on many nodes.

Every long command of the plugins (a whole-model embedding-space sweep, a top-k perplexity grid, an
ICL-vs-GD grid, the debugger's value index) is a list of independent *work units*. Under ``torchrun``
each process (rank) takes a deterministic, contiguous share of that list, writes what it finishes to
its own *shard* (an append-only log, one line per unit, flushed and fsynced), and rank 0 merges the
shards into exactly the files a single-process run writes. Nothing here schedules anything: the
launcher (torchrun, SLURM's srun) starts the processes, ``torch.distributed`` connects them.

- :func:`session` joins the process group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, nccl on CUDA
  (with a gloo side group for the small coordination messages). Without those variables it is a
  one-process run and nothing is initialised.
- :func:`split` assigns units to ranks (contiguous blocks, balanced by optional cost weights).
- :func:`agree` refuses to start when the ranks' settings differ (an all_gather of a fingerprint):
  a rank started with another ``-k`` or model would otherwise write shards that cannot be merged.
- :func:`sharded_map` runs units with per-unit checkpoints: a killed run, restarted with the same
  command (any world size), skips every unit some shard already holds. Shards from a run with other
  settings are refused, never mixed.
- :func:`checked` runs a check on every rank and raises the same error everywhere if any rank failed,
  so that no rank is left waiting at a barrier for a rank that stopped.

The shards live in a folder next to the outputs, which under ``--nnodes > 1`` must be on a file system
every node sees (the usual shared scratch). NCCL paths are written but have not been run on a GPU
here (the project's machine has none); gloo on the CPU is what the test suite runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

SHARD_FORMAT = "tl-plugins-shard/1"
ENV_TIMEOUT = "TL_PLUGINS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600  # ranks finish unevenly; a barrier may wait for the slowest one


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node).

    ``backend`` is None for a one-process run (no process group), else "gloo" or "nccl".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()
_coord_group: Any = None  # gloo group for objects and barriers when the default group is nccl


def _env_int(environ: Mapping[str, str], name: str, default: Optional[int], lo: int = 0) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"{name}: not set; torchrun sets it (run the command under torchrun, or unset "
                             "WORLD_SIZE for a one-process run)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: got {raw!r}; accepted: an int >= {lo}") from None
    if value < lo:
        raise ValueError(f"{name}: got {raw!r}; accepted: an int >= {lo}")
    return value


def from_env(environ: Optional[Mapping[str, str]] = None) -> Context:
    """The rank layout that torchrun (or srun with the same variables) put in the environment.

    No ``WORLD_SIZE`` (or ``WORLD_SIZE=1``): a one-process run. Otherwise ``RANK`` must be set and
    lie in ``0 .. WORLD_SIZE-1``; ``LOCAL_RANK`` defaults to ``RANK``.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1, lo=1)
    if world == 1:
        return SINGLE
    rank = _env_int(environ, "RANK", None)
    if rank >= world:
        raise ValueError(f"RANK: got {rank}; accepted: 0 .. {world - 1} (WORLD_SIZE={world})")
    local = _env_int(environ, "LOCAL_RANK", rank)
    return Context(rank, world, local, None)


def current() -> Context:
    """The process group this process is in (initialised by :func:`session` or by the caller), else
    :data:`SINGLE`. Library functions shard their work over it when it is there."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = _env_int(os.environ, "LOCAL_RANK", dist.get_rank())
    return Context(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def default_device(ctx: Optional[Context] = None) -> str:
    """``cuda:LOCAL_RANK`` where CUDA is available, else ``cpu``: where this rank's model goes."""
    ctx = current() if ctx is None else ctx
    return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"


def _timeout() -> datetime.timedelta:
    seconds = _env_int(os.environ, ENV_TIMEOUT, DEFAULT_TIMEOUT_S, lo=1)
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def session(backend: str = "auto") -> Iterator[Context]:
    """Join torchrun's process group for the length of a command; leave it afterwards.

    backend: "auto" (nccl where CUDA is available, else gloo), "gloo" or "nccl". A process group the
    caller already initialised is used as it is and left alone. Barrier timeout: the environment
    variable ``TL_PLUGINS_DIST_TIMEOUT_S`` (seconds; default 4 hours).
    """
    import torch.distributed as dist

    global _coord_group
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend: got {backend!r}; accepted: 'auto', 'gloo', 'nccl'")
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    ctx = from_env()
    if not ctx.distributed:
        yield SINGLE
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; WORLD_SIZE > 1 needs it")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"{name}: not set; torchrun sets it (WORLD_SIZE={ctx.world_size} asks for a "
                             "process group)")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # untested here (no GPU): one GPU per rank, the usual torchrun layout
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=ctx.rank, world_size=ctx.world_size,
                            timeout=_timeout())
    try:
        _coord_group = dist.new_group(backend="gloo", timeout=_timeout()) if backend == "nccl" else None
        yield Context(ctx.rank, ctx.world_size, ctx.local_rank, backend)
    finally:
        _coord_group = None
        dist.destroy_process_group()


def all_gather(obj: Any, ctx: Optional[Context] = None) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a one-process run. Also a barrier."""
    ctx = current() if ctx is None else ctx
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=_coord_group)
    return out


def barrier(ctx: Optional[Context] = None) -> None:
    """Wait until every rank is here (nothing to wait for in a one-process run)."""
    all_gather(None, ctx)


def checked(fn: Callable[[], Any], ctx: Optional[Context] = None) -> Any:
    """Run ``fn()`` on every rank; if it raised on any rank, raise on every rank.

    The rank that failed re-raises its own exception; the others raise one naming that rank and its
    message, so that a bad argument seen by one rank stops all of them instead of leaving the rest at
    a barrier until the timeout.
    """
    ctx = current() if ctx is None else ctx
    error: Optional[BaseException] = None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on this rank and the others
        error, value = exc, None
    reports = all_gather(None if error is None else f"{type(error).__name__}: {error}", ctx)
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise RuntimeError(f"rank {r} of {ctx.world_size} failed: {msg}")
    return value


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short stable hash of ``settings`` (JSON with sorted keys): equal settings, equal fingerprint."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agree(settings: Mapping[str, Any], ctx: Optional[Context] = None) -> str:
    """Refuse to go on unless every rank has the same ``settings``; return their fingerprint.

    Raises ValueError on every rank, naming the first rank that differs from rank 0 and the keys
    that differ (with both values).
    """
    ctx = current() if ctx is None else ctx
    fp = fingerprint(settings)
    gathered = all_gather((fp, dict(settings)), ctx)
    fp0, s0 = gathered[0]
    for r, (fpr, sr) in enumerate(gathered):
        if fpr != fp0:
            keys = sorted(k for k in set(s0) | set(sr) if s0.get(k) != sr.get(k))
            if len(keys) > 1 and "_units" in keys:  # the unit list follows from the other settings
                keys.remove("_units")
            detail = "; ".join(f"{k}={s0.get(k)!r} on rank 0, {sr.get(k)!r} on rank {r}" for k in keys)
            raise ValueError(f"settings: rank {r} of {ctx.world_size} was started with other settings than "
                             f"rank 0 ({detail}); every rank must run the same command")
    return fp


def owners(n_units: int, world_size: int, weights: Optional[Sequence[float]] = None) -> list[int]:
    """The rank that owns each of ``n_units`` units: contiguous blocks of about equal total weight.

    Deterministic (a function of the unit count, the weights and the world size only). A unit goes to
    the rank whose share of the total holds the unit's midpoint. weights: one cost per unit (default
    all 1); they only move the block boundaries.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: got {world_size!r}; accepted: an int >= 1")
    if weights is None:
        weights = [1.0] * n_units
    weights = [float(w) for w in weights]
    if len(weights) != n_units:
        raise ValueError(f"weights: got {len(weights)} weights for {n_units} units; accepted: one per unit")
    if any(not (w > 0) or w == float("inf") for w in weights):
        raise ValueError(f"weights: got {weights!r}; accepted: finite numbers > 0")
    total = sum(weights)
    out, start = [], 0.0
    for w in weights:
        mid = start + w / 2
        out.append(min(world_size - 1, int(mid * world_size / total)))
        start += w
    return out


def split(units: Sequence[Any], rank: int, world_size: int,
          weights: Optional[Sequence[float]] = None) -> list:
    """The units rank ``rank`` of ``world_size`` works on (see :func:`owners`), in their order."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < max(1, world_size):
        raise ValueError(f"rank: got {rank!r}; accepted: an int in 0 .. world_size-1 ({world_size - 1})")
    return [u for u, r in zip(units, owners(len(units), world_size, weights)) if r == rank]


def unit_done(name: str, key: str, ctx: Context) -> None:
    """Called after each unit's checkpoint is on disk. Does nothing; a seam for tests that kill a rank
    at a known point (a real SIGKILL, so that the resume path is the one a crash takes)."""


# -- shards ---------------------------------------------------------------------------------------

def unit_key(unit: Any) -> str:
    """A unit's name in the shard logs: its JSON (units are tuples or lists of JSON scalars)."""
    return json.dumps(list(unit) if isinstance(unit, tuple) else unit, separators=(",", ":"))


def _shard_name(ctx: Context) -> str:
    return f"rank{ctx.rank:05d}-of{ctx.world_size:05d}.jsonl"


def _read_log(path: Path) -> tuple[Optional[dict], dict, int]:
    """(header, {key: result}, byte length of the intact lines) of one shard log.

    A last line without its newline (the process died while writing it) is not counted.
    """
    data = path.read_bytes()
    header, done, good = None, {}, 0
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        try:
            rec = json.loads(line)
        except ValueError:
            break  # damaged: everything from here on is recomputed
        if header is None:
            header = rec
        else:
            done[rec["unit"]] = rec["result"]
        pos = good = nl + 1
    return header, done, good


def read_shards(shard_dir: Path, fp: str) -> dict:
    """Every finished unit in ``shard_dir``'s logs: {key: result}. Logs of another run are refused."""
    done: dict = {}
    if not shard_dir.is_dir():
        return done
    for path in sorted(shard_dir.glob("rank*.jsonl")):
        header, units, _ = _read_log(path)
        if header is None:
            continue
        if header.get("format") != SHARD_FORMAT or header.get("fingerprint") != fp:
            raise ValueError(
                f"out: {str(shard_dir)!r} holds shards of a run with other settings ({path.name}: fingerprint "
                f"{header.get('fingerprint')!r}, this run {fp!r}); resuming would mix them: use another output, "
                "or delete that folder")
        done.update(units)
    return done


class ShardLog:
    """This rank's append-only log: a header line (format, fingerprint, settings), then one JSON line
    per finished unit, each flushed and fsynced before the next unit starts."""

    def __init__(self, shard_dir: Path, fp: str, settings: Mapping[str, Any], ctx: Context):
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.path = shard_dir / _shard_name(ctx)
        if self.path.exists():
            header, _, good = _read_log(self.path)
            if header is None:
                self.path.unlink()
            else:
                with open(self.path, "r+b") as f:  # drop a half-written last line
                    f.truncate(good)
        if not self.path.exists():
            head = {"format": SHARD_FORMAT, "fingerprint": fp, "rank": ctx.rank, "world_size": ctx.world_size,
                    "settings": settings}
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(json.dumps(head, default=str) + "\n")
            os.replace(tmp, self.path)
        self._f = open(self.path, "ab")

    def append(self, key: str, result: Any) -> None:
        self._f.write(json.dumps({"unit": key, "result": result}).encode() + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


@dataclass
class ShardStats:
    """What one rank did: units it owns, computed now, found done in shards, seconds of work."""

    rank: int
    units: int
    computed: int
    resumed: int
    seconds: float


def sharded_map(name: str, units: Sequence[Any], fn: Callable[[Any], Any], *, shard_dir: Optional[Path],
                settings: Mapping[str, Any], merge: Callable[[list, list], Any],
                ctx: Optional[Context] = None, weights: Optional[Sequence[float]] = None,
                progress: bool = False) -> Any:
    """Run ``fn(unit)`` for every unit, split over the ranks, checkpointed; rank 0 merges.

    units: JSON-like values (tuples of str/int/float), each unique. ``fn`` returns a JSON-serialisable
    result (floats round-trip exactly through the logs). Every rank must pass the same ``units`` and
    ``settings`` (checked with :func:`agree`). shard_dir: where the logs go; None keeps nothing (no
    resume; results reach rank 0 over the process group). merge(results, stats): called on rank 0
    with every unit's result in ``units`` order and one :class:`ShardStats` per rank; its return value
    is returned on rank 0 (None elsewhere). After a successful merge the shard folder is deleted, so
    the outputs are the same files a one-process run leaves.
    """
    ctx = current() if ctx is None else ctx
    keys = [unit_key(u) for u in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"units: got {len(keys)} units with {len(set(keys))} distinct values; accepted: unique units")
    fp = agree({**settings, "_units": keys}, ctx)
    owner = owners(len(units), ctx.world_size, weights)
    mine = [i for i, r in enumerate(owner) if r == ctx.rank]
    done: dict = {}
    log: Optional[ShardLog] = None
    if shard_dir is not None:
        done = checked(lambda: read_shards(shard_dir, fp), ctx)
        log = checked(lambda: ShardLog(shard_dir, fp, settings, ctx), ctx)
    todo = [i for i in mine if keys[i] not in done]
    local: dict = {keys[i]: done[keys[i]] for i in mine if keys[i] in done}
    t0 = time.perf_counter()

    def work() -> None:
        it = todo
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(todo, desc=name + (f" [rank {ctx.rank}/{ctx.world_size}]" if ctx.distributed else ""),
                      position=ctx.local_rank, leave=False)
        for i in it:
            result = fn(units[i])
            if log is not None:
                log.append(keys[i], result)
            local[keys[i]] = result
            unit_done(name, keys[i], ctx)

    try:
        checked(work, ctx)
    finally:
        if log is not None:
            log.close()
    stats = ShardStats(ctx.rank, len(mine), len(todo), len(mine) - len(todo), round(time.perf_counter() - t0, 3))
    if shard_dir is None:
        gathered = all_gather((local, stats), ctx)
        results = {k: v for part, _ in gathered for k, v in part.items()}
        all_stats = [s for _, s in gathered]
    else:
        all_stats = all_gather(stats, ctx)  # also the barrier: every shard is complete after it
        results = None
    out = None
    if ctx.is_main:
        def do_merge():
            res = results if results is not None else read_shards(shard_dir, fp)
            missing = [k for k in keys if k not in res]
            if missing:
                raise RuntimeError(f"{name}: {len(missing)} units missing from the shards after every rank "
                                   f"finished (first: {missing[0]})")
            value = merge([res[k] for k in keys], all_stats)
            if shard_dir is not None:
                shutil.rmtree(shard_dir, ignore_errors=True)
            return value
        out = checked(do_merge, ctx)
    else:
        checked(lambda: None, ctx)
    return out


__all__ = ["Context", "SINGLE", "from_env", "current", "session", "default_device", "all_gather", "barrier",
           "checked", "fingerprint", "agree", "owners", "split", "unit_key", "read_shards", "ShardLog",
           "ShardStats", "sharded_map", "unit_done"]
